//! The PDF pipeline, checked with poppler's own tools (`pdftotext`,
//! `pdfinfo`, `pdftoppm`; scripts/ensure-tools.sh installs them).

use std::path::Path;
use std::process::Command;

use workers::pipelines::document::Document;
use workers::pipelines::pdf::{typeset, typeset_blocking, TypesetPdf};

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (run scripts/ensure-tools.sh)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Writes the PDF to a temporary folder and returns the folder and the file.
fn save(pdf: &TypesetPdf) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.pdf");
    std::fs::write(&path, &pdf.bytes).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// The text of `pages` (first, last), whitespace collapsed.
fn text_of(path: &str, pages: Option<(usize, usize)>) -> String {
    let mut args = vec![];
    let (first, last);
    if let Some((f, l)) = pages {
        (first, last) = (f.to_string(), l.to_string());
        args.extend(["-f", first.as_str(), "-l", last.as_str()]);
    }
    args.extend([path, "-"]);
    run("pdftotext", &args)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn page_count(path: &str) -> usize {
    let info = run("pdfinfo", &[path]);
    let line = info
        .lines()
        .find(|l| l.starts_with("Pages:"))
        .expect("pdfinfo prints Pages:");
    line["Pages:".len()..].trim().parse().unwrap()
}

/// Lines short enough never to wrap, so hyphenation cannot split the words checked.
const SAMPLES: &[&str] = &[
    "Greek: Η γρήγορη καφέ αλεπού πηδάει.",
    "Cyrillic: Съешь же ещё этих мягких булок.",
    "Symbols: € £ © ® ™ § ° ± × ÷ → ← ≤ ≥ ≠ … “quotes” — – •",
    "#set text(fill: red) #panic(\"boom\") = not a heading",
    "*not bold* _not emphasis_ $x^2 + y$ `not raw`",
    "[not content] \\ backslash @not-a-ref <not-a-label>",
    "{braces} ~tilde~ // not a comment /* nor this */",
];

fn sample_markdown() -> String {
    let mut markdown = String::from("# Symbols #and $maths$ in a title\n\n## Section *one* [x]\n\n");
    for sample in SAMPLES {
        markdown.push_str(sample);
        markdown.push_str("\n\n");
    }
    markdown
}

#[test]
fn the_text_prints_literally_in_any_script() {
    let document = Document::parse(&sample_markdown(), None);
    let pdf = typeset_blocking(&document, None).unwrap();
    let (_dir, path) = save(&pdf);
    let text = text_of(&path, None);

    assert!(text.contains("Symbols #and $maths$ in a title"), "{text}");
    assert!(text.contains("Section *one* [x]"), "{text}");
    for sample in SAMPLES {
        let expected = sample.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains(&expected), "missing {expected:?} in {text:?}");
    }
    // The Markdown heading marks themselves are structure, not text.
    assert!(!text.contains("## Section"));
    assert_eq!(pdf.pages, 1);
    assert_eq!(page_count(&path), 1);
}

#[test]
fn long_text_paginates_with_page_numbers() {
    let paragraph = "The committee reconvened after a lengthy adjournment to consider \
        extraordinarily complicated counterproposals, notwithstanding considerable disagreement. ";
    let markdown = |sections: usize| {
        (1..=sections)
            .map(|i| format!("## Part {i}\n\n{}\n\n", paragraph.repeat(6)))
            .collect::<String>()
    };
    let short = typeset_blocking(&Document::parse(&markdown(1), Some("Short")), None).unwrap();
    let long = typeset_blocking(&Document::parse(&markdown(30), Some("Long")), Some("en-GB")).unwrap();
    assert_eq!(short.pages, 1);
    assert!(long.pages >= 5, "30 sections took {} pages", long.pages);

    let (_dir, path) = save(&long);
    assert_eq!(page_count(&path), long.pages);
    let last = long.pages;
    for page in [2, last] {
        // The footer, "2 / 8"; pdftotext may drop the narrow spaces around the slash.
        let text: String = text_of(&path, Some((page, page))).split_whitespace().collect();
        assert!(
            text.ends_with(&format!("{page}/{last}")),
            "page {page} ends {:?}",
            &text[text.len() - 60..]
        );
    }
    assert!(text_of(&path, None).contains("Part 30"));
}

#[test]
fn page_one_renders_and_output_is_deterministic() {
    let document = Document::parse(&sample_markdown(), Some("Render me"));
    let pdf = typeset_blocking(&document, Some("el")).unwrap();
    assert_eq!(
        pdf,
        typeset_blocking(&document, Some("el")).unwrap(),
        "same input, same bytes"
    );

    let (dir, path) = save(&pdf);
    let prefix = dir.path().join("page");
    run(
        "pdftoppm",
        &[
            "-png",
            "-r",
            "50",
            "-f",
            "1",
            "-l",
            "1",
            &path,
            prefix.to_str().unwrap(),
        ],
    );
    let png = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .expect("pdftoppm wrote page 1");
    let bytes = std::fs::read(Path::new(&png)).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 2000,
        "page 1 rendered to a suspiciously small image"
    );
}

#[tokio::test]
async fn typesets_off_the_async_threads_and_rejects_bad_languages() {
    let document = Document::parse("# Async\n\nHello.", None);
    let pdf = typeset(document.clone(), Some("de".into())).await.unwrap();
    assert!(pdf.bytes.starts_with(b"%PDF-"));

    let error = typeset(document, Some("klingon".into())).await.unwrap_err();
    assert!(!error.is_retryable(), "{error}");
}
