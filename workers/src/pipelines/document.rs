//! The structure the PDF and audio pipelines read from Markdown-ish text: a
//! title, then headings, paragraphs and bullet lists. Nothing else is
//! interpreted: emphasis markers, links, HTML and the like stay as the
//! characters they are.

use serde::Serialize;

/// Used when neither the input nor the text gives a title.
pub const UNTITLED: &str = "Untitled";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Document {
    pub title: String,
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Block {
    /// `#` is level 1, `##` level 2, deeper levels are level 3.
    Heading { level: u8, text: String },
    /// Consecutive lines, joined with single spaces.
    Paragraph { text: String },
    /// Consecutive `- `, `* ` or `+ ` lines.
    List { items: Vec<String> },
}

impl Document {
    /// Parses `markdown`. The title is `title` when given; otherwise a `# `
    /// heading that opens the text becomes the title. A leading heading that
    /// repeats the given title is dropped so it does not print twice.
    pub fn parse(markdown: &str, title: Option<&str>) -> Document {
        let mut blocks = parse_blocks(markdown);
        let opening_title = match blocks.first() {
            Some(Block::Heading { level: 1, text }) => Some(text.clone()),
            _ => None,
        };
        let given = title.map(str::trim).filter(|t| !t.is_empty());
        let title = match (given, opening_title) {
            (Some(given), Some(opening)) if given == opening => {
                blocks.remove(0);
                given.to_owned()
            }
            (Some(given), _) => given.to_owned(),
            (None, Some(opening)) => {
                blocks.remove(0);
                opening
            }
            (None, None) => UNTITLED.to_owned(),
        };
        Document { title, blocks }
    }

    /// Every string that prints: the title, then each heading, paragraph
    /// and list item in order.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.title.as_str()).chain(self.blocks.iter().flat_map(|block| {
            let texts: Vec<&str> = match block {
                Block::Heading { text, .. } | Block::Paragraph { text } => vec![text],
                Block::List { items } => items.iter().map(String::as_str).collect(),
            };
            texts
        }))
    }

    /// Number of words in the title and every block.
    pub fn word_count(&self) -> usize {
        self.texts().map(|text| text.split_whitespace().count()).sum()
    }
}

enum Line<'a> {
    Blank,
    Heading(u8, &'a str),
    Bullet(&'a str),
    Text(&'a str),
}

fn classify(line: &str) -> Line<'_> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Line::Blank;
    }
    let hashes = trimmed.bytes().take_while(|&b| b == b'#').count();
    if (1..=6).contains(&hashes) {
        let rest = &trimmed[hashes..];
        // `#hashtag` is text; a heading needs a space after its marks.
        if rest.is_empty() || rest.starts_with([' ', '\t']) {
            // A closing run of `#` is decoration (`## Title ##`).
            let text = rest.trim().trim_end_matches('#').trim_end();
            return Line::Heading(hashes.min(3) as u8, text);
        }
    }
    for marker in ["- ", "* ", "+ "] {
        if let Some(item) = trimmed.strip_prefix(marker) {
            return Line::Bullet(item.trim());
        }
    }
    Line::Text(trimmed)
}

fn parse_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    // The block being built; lines append to it until a blank line or a
    // line of another kind ends it.
    let mut open: Option<Block> = None;
    for line in markdown.lines() {
        match (classify(line), &mut open) {
            (Line::Blank, _) => blocks.extend(open.take()),
            (Line::Heading(level, text), _) => {
                blocks.extend(open.take());
                if !text.is_empty() {
                    blocks.push(Block::Heading {
                        level,
                        text: text.to_owned(),
                    });
                }
            }
            (Line::Bullet(item), Some(Block::List { items })) => items.push(item.to_owned()),
            (Line::Bullet(item), _) => {
                blocks.extend(open.take());
                open = Some(Block::List {
                    items: vec![item.to_owned()],
                });
            }
            // A wrapped list item continues on the next line.
            (Line::Text(more), Some(Block::List { items })) if line.starts_with([' ', '\t']) => {
                let last = items.last_mut().expect("a list holds at least one item");
                append_words(last, more);
            }
            (Line::Text(more), Some(Block::Paragraph { text })) => append_words(text, more),
            (Line::Text(text), _) => {
                blocks.extend(open.take());
                open = Some(Block::Paragraph {
                    text: text.to_owned(),
                });
            }
        }
    }
    blocks.extend(open);
    blocks
}

fn append_words(text: &mut String, more: &str) {
    if !text.is_empty() {
        text.push(' ');
    }
    text.push_str(more);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paragraph(text: &str) -> Block {
        Block::Paragraph { text: text.into() }
    }

    fn heading(level: u8, text: &str) -> Block {
        Block::Heading {
            level,
            text: text.into(),
        }
    }

    #[test]
    fn opening_heading_becomes_the_title() {
        let doc = Document::parse("# The Sea\n\nWaves\nbreak.\n\n## Tides\nTwice a day.", None);
        assert_eq!(doc.title, "The Sea");
        assert_eq!(
            doc.blocks,
            vec![
                paragraph("Waves break."),
                heading(2, "Tides"),
                paragraph("Twice a day.")
            ]
        );
    }

    #[test]
    fn given_title_wins_and_a_repeat_is_dropped() {
        let doc = Document::parse("# Other\n\nText.", Some("Given"));
        assert_eq!(doc.title, "Given");
        assert_eq!(doc.blocks[0], heading(1, "Other"));

        let doc = Document::parse("# Given\n\nText.", Some("Given"));
        assert_eq!(doc.blocks, vec![paragraph("Text.")]);

        assert_eq!(Document::parse("Just text.", None).title, UNTITLED);
    }

    #[test]
    fn lists_hashtags_and_closing_hashes() {
        let doc = Document::parse(
            "Intro\n- one\n  continued\n* two\n\n#hashtag stays text\n### Deep ###\n##",
            Some("T"),
        );
        assert_eq!(
            doc.blocks,
            vec![
                paragraph("Intro"),
                Block::List {
                    items: vec!["one continued".into(), "two".into()]
                },
                paragraph("#hashtag stays text"),
                heading(3, "Deep"),
            ]
        );
    }

    #[test]
    fn markup_characters_are_kept() {
        let text = "*not bold* _not em_ $x$ [a](b) \\ @ref <label> `code`";
        let doc = Document::parse(text, Some("T"));
        assert_eq!(doc.blocks, vec![paragraph(text)]);
        assert_eq!(doc.word_count(), 1 + 10);
    }
}
