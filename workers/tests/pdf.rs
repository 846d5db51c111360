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

/// Scripts typst's embedded fonts lack; fonts-noto-core has them
/// (scripts/ensure-tools.sh installs it, the image too).
const OTHER_SCRIPTS: &[(&str, &str, &str)] = &[
    ("Thai", "สวัสดีชาวโลก", "NotoSansThai"),
    ("Bengali", "ওহে বিশ্ব", "NotoSansBengali"),
    ("Tamil", "வணக்கம் உலகம்", "NotoSansTamil"),
    ("Ethiopic", "ሰላም ልዑል", "NotoSansEthiopic"),
];

#[test]
fn scripts_the_embedded_fonts_lack_print_with_the_machines_fonts() {
    let markdown: String = OTHER_SCRIPTS
        .iter()
        .map(|(script, sample, _)| format!("{script}: {sample}\n\n"))
        .collect();
    let pdf = typeset_blocking(&Document::parse(&markdown, Some("Scripts")), None).unwrap();
    assert_eq!(pdf.uncovered, Vec::<char>::new(), "characters printed as boxes");

    let (_dir, path) = save(&pdf);
    let fonts = run("pdffonts", &[&path]);
    let text = text_of(&path, None);
    for (script, sample, font) in OTHER_SCRIPTS {
        assert!(fonts.contains(font), "{script}: {font} not embedded:\n{fonts}");
        assert!(
            text.contains(sample),
            "{script}: {sample:?} missing from {text:?}"
        );
    }
    // The template's own family still sets the Latin text, not a machine font.
    assert!(fonts.contains("LibertinusSerif-Regular"), "{fonts}");
}

#[test]
fn a_character_no_font_has_is_named_not_dropped_silently() {
    // U+10FFFD is a private-use code point: no font defines it. The joiner
    // and the variation selector print as nothing by design.
    let markdown = "Private \u{10FFFD} use, twice \u{10FFFD}, then a\u{200D}joiner and \u{FE0F} selector.";
    let pdf = typeset_blocking(&Document::parse(markdown, None), None).unwrap();
    assert_eq!(pdf.uncovered, vec!['\u{10FFFD}']);
    assert_eq!(pdf.uncovered_code_points(), vec!["U+10FFFD"]);
    // The rest of the text prints; the PDF is still made.
    let (_dir, path) = save(&pdf);
    assert!(text_of(&path, None).contains("Private"));

    let covered = typeset_blocking(&Document::parse(&sample_markdown(), None), None).unwrap();
    assert!(covered.uncovered.is_empty(), "{:?}", covered.uncovered);
}

/// The right edge of every word pdftotext finds, in points, with the word.
fn word_right_edges(path: &str) -> Vec<(f64, String)> {
    let html = run("pdftotext", &["-bbox", path, "-"]);
    html.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line.strip_prefix("<word ")?;
            let x_max = rest.split("xMax=\"").nth(1)?.split('"').next()?.parse().ok()?;
            let word = rest.split('>').nth(1)?.split('<').next()?.to_owned();
            Some((x_max, word))
        })
        .collect()
}

#[test]
fn a_word_longer_than_a_line_breaks_inside_the_margin() {
    let url = format!(
        "https://example.com/{}?query={}",
        "a-long-path-segment/".repeat(12),
        "x".repeat(90)
    );
    let word = "Donaudampfschifffahrtsgesellschaftskapitänswitwe".repeat(4);
    // Neither a URL nor a word: nothing in it to hyphenate.
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".repeat(2);
    let path = "/var/lib/backlog/artifacts/0193a6c2-7f41-7c3e-9d1b-4a5e6f708192/document.pdf";
    let markdown = format!(
        "# {url}\n\nRead {url} before the end.\n\nThen {word}, in German.\n\n\
         The digest {digest} and the file {path}{path}.\n\n- {url}\n"
    );
    let pdf = typeset_blocking(&Document::parse(&markdown, None), None).unwrap();
    let (_dir, path) = save(&pdf);

    // A4 is 595.28 pt wide and the template's side margins are 2.4 cm
    // (68.03 pt). A hyphen ending a line hangs into the margin by design
    // (typst's overhang, about 2 pt at 11 pt), so 4 pt are allowed.
    let right_margin = 595.28 - 68.03;
    let words = word_right_edges(&path);
    assert!(words.len() > 10, "pdftotext found {} words", words.len());
    let past: Vec<_> = words
        .iter()
        .filter(|(x_max, _)| *x_max > right_margin + 4.0)
        .collect();
    assert!(
        past.is_empty(),
        "past the margin at {right_margin:.1} pt: {past:?}"
    );
    // Nothing is lost to the breaks: every piece of the URL is still there.
    let text: String = text_of(&path, None).split_whitespace().collect();
    assert!(
        text.contains("a-long-path-segment/a-long-path-segment/"),
        "{text}"
    );
    assert!(text.contains(&"x".repeat(40)), "{text}");
    assert!(text.contains(&digest[..48]), "{text}");

    // The title is set at twice the size: a run of 58, short of the body's
    // 61, is wider than the page there.
    let title = &digest[..58];
    let pdf = typeset_blocking(&Document::parse("Body.", Some(title)), None).unwrap();
    let (_dir, path) = save(&pdf);
    let words = word_right_edges(&path);
    let past: Vec<_> = words
        .iter()
        .filter(|(x_max, _)| *x_max > right_margin + 4.0)
        .collect();
    assert!(past.is_empty(), "the title runs past the margin: {past:?}");
    let text: String = text_of(&path, None).split_whitespace().collect();
    assert!(text.contains(title), "{text}");
}
