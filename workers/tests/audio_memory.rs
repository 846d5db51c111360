//! What narrating a long text holds in memory at its peak, counted by this
//! binary's allocator. A job may carry 256 KiB of text, about 645 MB of
//! espeak-ng samples: they must never be held whole, only the MP3 and the
//! pieces in flight. (Its own binary: no other test allocates meanwhile.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use workers::pipelines::audio::{Espeak, Narrator, TtsProvider};
use workers::pipelines::document::Document;

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(live, Ordering::SeqCst);
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is the system allocator's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc` and `dealloc`: the system allocator's contract.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
            grew(new_size);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test]
async fn a_long_narration_never_holds_its_samples_whole() {
    let paragraph = "The river runs through the old town, past the market and the mill. \
        In spring the water rises, and the children watch the boats go by from the bridge. ";
    let text: String = (1..=24)
        .map(|i| format!("## Part {i}\n\n{}\n\n", paragraph.repeat(2)))
        .collect();
    let document = Document::parse(&text, Some("The River"));
    let narrator = Narrator::new(TtsProvider::Espeak(Espeak::default()), 2);

    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let narration = narrator.narrate(&document, None).await.unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;

    let samples_bytes = (narration.duration_seconds * f64::from(narration.sample_rate) * 2.0) as usize;
    eprintln!(
        "{} chars, {:.0} s of speech: samples {} kB, MP3 {} kB, peak {} kB",
        text.len(),
        narration.duration_seconds,
        samples_bytes / 1000,
        narration.bytes.len() / 1000,
        peak / 1000
    );
    // Holding them whole took 2.5 times their size (the pieces, the joined
    // signal, then the encoder's buffer); the MP3 buffer is most of it now.
    assert!(
        peak < samples_bytes * 2 / 3,
        "peak {peak} bytes for {samples_bytes} bytes of samples"
    );
}
