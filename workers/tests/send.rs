//! The runtime runs pipelines on a multi-threaded executor, which needs every
//! pipeline future to be `Send`. A borrowed stream inside one once broke this;
//! this file fails to compile if it happens again.

use bytes::Bytes;
use store::ArtifactStore;
use workers::pipelines::audio::{Espeak, Narrator, TtsProvider};
use workers::pipelines::document::Document;
use workers::pipelines::pdf;
use workers::pipelines::text::{LlmProvider, PromptKind, TextRequest};

fn assert_send<T: Send>(_: &T) {}

#[test]
fn pipeline_futures_are_send() {
    let document = Document::parse("# T\n\nText.", None);
    let narrator = Narrator::new(TtsProvider::Espeak(Espeak::default()), 1);
    assert_send(&narrator.narrate(&document, None));

    let request = TextRequest {
        kind: PromptKind::Text,
        prompt: "p".into(),
        title: None,
        lang: None,
    };
    assert_send(&LlmProvider::Offline.generate(&request));

    assert_send(&pdf::typeset(document, None));

    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::local(dir.path()).unwrap();
    assert_send(&store.put("k", Bytes::new(), "text/plain"));
    assert_send(&store.get("k"));
    assert_send(&store.stream_range("k", 0..1));
}
