//! The PDF pipeline: a [`Document`] typeset with typst, as a library, into a
//! PDF with embedded fonts.
//!
//! The text is data, never markup: the template (`pdf.typ`) is fixed, and
//! the document reaches it as a JSON file it loads with `json()`. Strings
//! from JSON print as the characters they are, so `#`, `*`, `$`, `[`, `\`,
//! `@`, `<` and the rest appear in the PDF exactly as written.
//!
//! Fonts: the ones typst embeds set every Latin, Greek and Cyrillic text, the
//! same on every machine; other scripts (Thai, Bengali, CJK, ...) fall
//! back to the machine's own fonts, which the image installs (Noto). A
//! character no font has is named in [`TypesetPdf::uncovered`], not printed
//! as a silent empty box.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::LazyLock;

use typst::diag::{FileError, FileResult, SourceDiagnostic};
use typst::foundations::{Bytes, Datetime, Duration};
use typst::syntax::{FileId, RootedPath, Source, VirtualPath, VirtualRoot};
use typst::text::{is_default_ignorable, Font, FontBook, FontInfo, FontVariant};
use typst::utils::LazyHash;
use typst::{Library, LibraryExt, World};
use typst_kit::fonts::{FontPath, FontStore};
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
    /// Characters of the text that no font on this machine has, in code
    /// point order: they print as empty boxes. Empty when all printed.
    pub uncovered: Vec<char>,
}

/// How many uncovered characters a PDF's metadata names; a text in a
/// script with no font would otherwise list hundreds.
pub const UNCOVERED_LISTED: usize = 20;

impl TypesetPdf {
    /// The uncovered characters as code points (`U+0F00`), at most
    /// [`UNCOVERED_LISTED`], for the artifact's metadata and the log.
    pub fn uncovered_code_points(&self) -> Vec<String> {
        self.uncovered
            .iter()
            .take(UNCOVERED_LISTED)
            .map(|c| format!("U+{:04X}", u32::from(*c)))
            .collect()
    }
}

// The bytes are summarised: a failing test or a log line should not dump megabytes.
impl std::fmt::Debug for TypesetPdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypesetPdf")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("pages", &self.pages)
            .field("uncovered", &self.uncovered)
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
        uncovered: uncovered(FONTS.book(), document.texts()),
    })
}

/// The characters of `texts` that no font in `book` covers. Spaces,
/// control and default-ignorable characters (joiners, variation
/// selectors) print as nothing by design and are never reported.
fn uncovered<'a>(book: &FontBook, texts: impl Iterator<Item = &'a str>) -> Vec<char> {
    let distinct: BTreeSet<char> = texts
        .flat_map(str::chars)
        .filter(|c| !c.is_whitespace() && !c.is_control() && !is_default_ignorable(*c))
        .collect();
    distinct
        .into_iter()
        .filter(|c| {
            book.select_fallback(None, FontVariant::default(), c.encode_utf8(&mut [0; 4]))
                .is_none()
        })
        .collect()
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

/// The fonts typst embeds (Libertinus Serif, New Computer Modern, DejaVu
/// Sans Mono: the families the template names), then the machine's
/// (fontconfig's folders, `/usr/share/fonts`, `~/.fonts`), which typst
/// falls back to for characters the embedded ones lack. Loaded on first
/// use; a font file is read only when a document needs it.
static FONTS: LazyLock<FontStore> = LazyLock::new(|| font_store(typst_kit::fonts::system()));

/// Finds the fonts now rather than at the first document; returns how many.
pub fn load_fonts() -> usize {
    FONTS.book().families().map(|(_, infos)| infos.count()).sum()
}

/// The embedded fonts first, then `machine`'s fonts in path order, so the
/// choice between two equally good fallbacks never depends on the order a
/// folder lists its files in. A machine copy of an embedded family (Debian
/// ships DejaVu Sans Mono) is left out: text the template sets in those
/// families prints with the embedded copy on every machine.
fn font_store(machine: impl Iterator<Item = (FontPath, FontInfo)>) -> FontStore {
    let mut store = FontStore::new();
    let mut embedded_families = HashSet::new();
    for (font, info) in typst_kit::fonts::embedded() {
        embedded_families.insert(info.family.to_lowercase());
        store.push((font, info));
    }
    let mut machine: Vec<_> = machine
        .filter(|(_, info)| !embedded_families.contains(&info.family.to_lowercase()))
        .collect();
    machine.sort_by(|(a, _), (b, _)| (&a.path, a.index).cmp(&(&b.path, b.index)));
    store.extend(machine);
    store
}

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
        FONTS.book()
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
        FONTS.font(index)
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
    fn at_most_twenty_uncovered_characters_are_named() {
        let pdf = TypesetPdf {
            bytes: Vec::new(),
            pages: 1,
            uncovered: ('\u{0F00}'..='\u{0F1F}').collect(),
        };
        let named = pdf.uncovered_code_points();
        assert_eq!(named.len(), 20, "the README promises twenty at most");
        assert_eq!(named.first().map(String::as_str), Some("U+0F00"));
        assert_eq!(named.last().map(String::as_str), Some("U+0F13"));
    }

    #[test]
    fn language_codes() {
        assert_eq!(language_code(None).unwrap(), "en");
        assert_eq!(language_code(Some("en-GB")).unwrap(), "en");
        assert_eq!(language_code(Some("EL")).unwrap(), "el");
        assert!(!language_code(Some("english")).unwrap_err().is_retryable());
        assert!(language_code(Some("1a")).is_err());
    }

    #[test]
    fn a_machine_copy_of_an_embedded_family_is_left_out() {
        let embedded: Vec<_> = typst_kit::fonts::embedded().collect();
        let (mono, _) = embedded
            .iter()
            .find(|(_, info)| info.family == "DejaVu Sans Mono")
            .expect("typst embeds DejaVu Sans Mono");
        let machine = tempfile::tempdir().unwrap();
        std::fs::write(machine.path().join("DejaVuSansMono.ttf"), mono.data().as_slice()).unwrap();
        assert_eq!(
            typst_kit::fonts::scan(machine.path()).count(),
            1,
            "the copy is a font"
        );

        let store = font_store(typst_kit::fonts::scan(machine.path()));
        assert!(store.font(embedded.len() - 1).is_some());
        assert!(
            store.font(embedded.len()).is_none(),
            "the machine's copy was added"
        );
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
