//! The PDF pipeline: a [`Document`] typeset with typst, as a library, into a
//! PDF with embedded fonts.
//!
//! The text is data, never markup: the template (`pdf.typ`) is fixed, and
//! the document reaches it as a JSON file it loads with `json()`. Strings
//! from JSON print as the characters they are, so `#`, `*`, `$`, `[`, `\`,
//! `@`, `<` and the rest appear in the PDF exactly as written.

use std::path::PathBuf;
use std::sync::LazyLock;

use typst::diag::{FileError, FileResult, SourceDiagnostic};
use typst::foundations::{Bytes, Datetime, Duration};
use typst::syntax::{FileId, RootedPath, Source, VirtualPath, VirtualRoot};
use typst::text::{Font, FontBook};
use typst::utils::LazyHash;
use typst::{Library, LibraryExt, World};
use typst_layout::PagedDocument;

use super::document::Document;
use crate::{Error, Result};

/// The page design, as typst source.
const TEMPLATE: &str = include_str!("pdf.typ");

/// Used when the job names no language.
pub const DEFAULT_LANG: &str = "en";

/// A typeset PDF.
#[derive(Clone, PartialEq, Eq)]
pub struct TypesetPdf {
    pub bytes: Vec<u8>,
    pub pages: usize,
}

// The bytes are summarised: a failing test or a log line should not dump megabytes.
impl std::fmt::Debug for TypesetPdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypesetPdf")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("pages", &self.pages)
            .finish()
    }
}

/// Typesets `document` on a blocking thread: layout is CPU-bound and would
/// otherwise stall the async runtime for the length of a long document.
pub async fn typeset(document: Document, lang: Option<String>) -> Result<TypesetPdf> {
    tokio::task::spawn_blocking(move || typeset_blocking(&document, lang.as_deref()))
        .await
        .map_err(|e| Error::Typeset(format!("typesetting thread failed: {e}")))?
}

/// Typesets `document` in `lang` (an ISO 639 code such as `en`, `de`, `el`;
/// a region suffix like `en-GB` is ignored), which picks the hyphenation
/// patterns. The same input gives the same bytes.
pub fn typeset_blocking(document: &Document, lang: Option<&str>) -> Result<TypesetPdf> {
    let lang = language_code(lang)?;
    let data = serde_json::json!({
        "title": document.title,
        "lang": lang,
        "blocks": document.blocks,
    });
    let world = DocumentWorld {
        main: Source::new(*MAIN_ID, TEMPLATE.to_owned()),
        data: Bytes::new(serde_json::to_vec(&data).expect("a document serialises to JSON")),
    };
    let compiled = typst::compile::<PagedDocument>(&world).output;
    // typst memoises across compilations; bound what a long-lived worker keeps.
    typst::comemo::evict(10);
    let paged = compiled.map_err(|errors| Error::Typeset(describe(&errors)))?;
    let bytes = typst_pdf::pdf(&paged, &typst_pdf::PdfOptions::default())
        .map_err(|errors| Error::Typeset(describe(&errors)))?;
    Ok(TypesetPdf {
        bytes,
        pages: paged.pages().len(),
    })
}

/// The primary subtag of `lang`, checked (the job's input contract already
/// refuses malformed tags): typst takes two or three letters.
fn language_code(lang: Option<&str>) -> Result<String> {
    let Some(lang) = lang.map(str::trim).filter(|l| !l.is_empty()) else {
        return Ok(DEFAULT_LANG.to_owned());
    };
    queue::input::primary_language(lang).map_err(|message| Error::InvalidInput(format!("`lang` {message}")))
}

fn describe(errors: &[SourceDiagnostic]) -> String {
    errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

fn file_id(path: &str) -> FileId {
    RootedPath::new(
        VirtualRoot::Project,
        VirtualPath::new(path).expect("a valid virtual path"),
    )
    .intern()
}

// Ids are interned for the life of the process, so two fixed ones are made
// once and reused; a fresh id per document would leak.
static MAIN_ID: LazyLock<FileId> = LazyLock::new(|| file_id("/main.typ"));
static DATA_ID: LazyLock<FileId> = LazyLock::new(|| file_id("/document.json"));

static LIBRARY: LazyLock<LazyHash<Library>> = LazyLock::new(|| LazyHash::new(Library::default()));

/// The fonts typst-assets embeds in the binary (Libertinus Serif, New
/// Computer Modern, DejaVu Sans Mono): no system fonts are read, so every
/// machine produces the same PDF.
static FONTS: LazyLock<(LazyHash<FontBook>, Vec<Font>)> = LazyLock::new(|| {
    let fonts: Vec<Font> = typst_assets::fonts()
        .flat_map(|data| Font::iter(Bytes::new(data)))
        .collect();
    (LazyHash::new(FontBook::from_fonts(&fonts)), fonts)
});

/// What typst sees: the template as `/main.typ` and the document as
/// `/document.json`; nothing else exists.
struct DocumentWorld {
    main: Source,
    data: Bytes,
}

impl World for DocumentWorld {
    fn library(&self) -> &LazyHash<Library> {
        &LIBRARY
    }

    fn book(&self) -> &LazyHash<FontBook> {
        &FONTS.0
    }

    fn main(&self) -> FileId {
        self.main.id()
    }

    fn source(&self, id: FileId) -> FileResult<Source> {
        if id == self.main.id() {
            Ok(self.main.clone())
        } else {
            Err(not_found(id))
        }
    }

    fn file(&self, id: FileId) -> FileResult<Bytes> {
        if id == *DATA_ID {
            Ok(self.data.clone())
        } else {
            Err(not_found(id))
        }
    }

    fn font(&self, index: usize) -> Option<Font> {
        FONTS.1.get(index).cloned()
    }

    fn today(&self, _offset: Option<Duration>) -> Option<Datetime> {
        // No clock: the output must not depend on the day it was made.
        None
    }
}

fn not_found(id: FileId) -> FileError {
    FileError::NotFound(PathBuf::from(id.vpath().get_with_slash()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_codes() {
        assert_eq!(language_code(None).unwrap(), "en");
        assert_eq!(language_code(Some("en-GB")).unwrap(), "en");
        assert_eq!(language_code(Some("EL")).unwrap(), "el");
        assert!(!language_code(Some("english")).unwrap_err().is_retryable());
        assert!(language_code(Some("1a")).is_err());
    }

    #[test]
    fn the_template_finds_only_its_data() {
        let world = DocumentWorld {
            main: Source::new(*MAIN_ID, TEMPLATE.to_owned()),
            data: Bytes::new(b"{}".to_vec()),
        };
        assert!(world.file(*DATA_ID).is_ok());
        assert!(world.file(file_id("/etc/passwd")).is_err());
        assert!(world.source(*DATA_ID).is_err());
    }
}
