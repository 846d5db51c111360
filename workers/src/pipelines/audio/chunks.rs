//! Cutting a document into the pieces a TTS provider speaks: whole sentences
//! where possible, never longer than the provider's limit, with the pause
//! that follows each piece.

use std::time::Duration;

use crate::pipelines::document::{Block, Document};

/// Silence between pieces of one paragraph.
pub const SENTENCE_PAUSE: Duration = Duration::from_millis(250);
/// Silence after a title, heading, paragraph or list item.
pub const BLOCK_PAUSE: Duration = Duration::from_millis(650);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpokenChunk {
    pub text: String,
    pub pause_after: Duration,
}

/// The document as chunks of at most `max_chars` characters each, in order.
pub fn spoken_chunks(document: &Document, max_chars: usize) -> Vec<SpokenChunk> {
    let max_chars = max_chars.max(20);
    let mut units: Vec<String> = vec![as_statement(&document.title)];
    for block in &document.blocks {
        match block {
            Block::Heading { text, .. } => units.push(as_statement(text)),
            Block::Paragraph { text } => units.push(text.clone()),
            Block::List { items } => units.extend(items.iter().map(|item| as_statement(item))),
        }
    }
    let mut chunks = Vec::new();
    for unit in units.iter().filter(|u| !u.trim().is_empty()) {
        let start = chunks.len();
        for text in pack(sentences(unit), max_chars) {
            chunks.push(SpokenChunk {
                text,
                pause_after: SENTENCE_PAUSE,
            });
        }
        if let Some(last) = chunks[start..].last_mut() {
            last.pause_after = BLOCK_PAUSE;
        }
    }
    chunks
}

/// Ends `text` with a full stop when it has no closing punctuation, so a
/// heading is spoken with a falling, final tone rather than run into what follows.
fn as_statement(text: &str) -> String {
    let text = text.trim();
    match text.chars().last() {
        Some(c) if c.is_alphanumeric() => format!("{text}."),
        _ => text.to_owned(),
    }
}

/// Splits after `.`, `!`, `?` or `…` (and any closing quotes or brackets)
/// when whitespace follows, and after CJK full stops.
fn sentences(text: &str) -> Vec<&str> {
    const TERMINAL: &[char] = &['.', '!', '?', '…'];
    const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '»'];
    const CJK_TERMINAL: &[char] = &['。', '！', '？'];
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let mut end = i + c.len_utf8();
        let boundary = if CJK_TERMINAL.contains(&c) {
            true
        } else if TERMINAL.contains(&c) {
            while let Some(&(j, closer)) = chars.peek() {
                if !CLOSERS.contains(&closer) && !TERMINAL.contains(&closer) {
                    break;
                }
                end = j + closer.len_utf8();
                chars.next();
            }
            chars.peek().is_none_or(|&(_, next)| next.is_whitespace())
        } else {
            false
        };
        if boundary {
            out.push(text[start..end].trim());
            start = end;
        }
    }
    out.push(text[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// Joins consecutive sentences while they fit in `max_chars`; a sentence
/// longer than that is cut at spaces (or, with none, anywhere).
fn pack(sentences: Vec<&str>, max_chars: usize) -> Vec<String> {
    let mut chunks: Vec<String> = Vec::new();
    let mut current = String::new();
    for sentence in sentences {
        for piece in cut_to_length(sentence, max_chars) {
            let joined = current.chars().count() + 1 + piece.chars().count();
            if !current.is_empty() && joined > max_chars {
                chunks.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(piece);
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

fn cut_to_length(mut text: &str, max_chars: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    while text.chars().count() > max_chars {
        // Byte offset just past the `max_chars`-th character.
        let limit = text.char_indices().nth(max_chars).map_or(text.len(), |(i, _)| i);
        let cut = text[..limit]
            .rfind(char::is_whitespace)
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        pieces.push(text[..cut].trim_end());
        text = text[cut..].trim_start();
    }
    if !text.is_empty() {
        pieces.push(text);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_boundaries() {
        assert_eq!(
            sentences("One. Two! \"Three?\" Four… five 3.14 six. 終わり。次"),
            vec![
                "One.",
                "Two!",
                "\"Three?\"",
                "Four…",
                "five 3.14 six.",
                "終わり。",
                "次"
            ]
        );
        assert_eq!(sentences("No full stop"), vec!["No full stop"]);
    }

    #[test]
    fn chunks_respect_the_limit_and_keep_every_word() {
        let long = "word ".repeat(70);
        let text = format!("Short one. {long}. Another short one. {}", "x".repeat(130));
        let chunks = pack(sentences(&text), 60);
        assert!(chunks.iter().all(|c| c.chars().count() <= 60), "{chunks:?}");
        let words = |s: &str| {
            s.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
                .concat()
        };
        assert_eq!(words(&chunks.join(" ")), words(&text));
    }

    #[test]
    fn blocks_end_with_a_longer_pause() {
        let document = Document::parse("# Title\n\n## Part\n\nOne. Two.\n\n- item", None);
        let chunks = spoken_chunks(&document, 1000);
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["Title.", "Part.", "One. Two.", "item."]);
        assert!(chunks.iter().all(|c| c.pause_after == BLOCK_PAUSE));

        let chunks = spoken_chunks(
            &Document::parse("Alpha beta gamma delta. Epsilon zeta eta theta.", Some("T")),
            30,
        );
        assert_eq!(chunks[1].pause_after, SENTENCE_PAUSE);
        assert_eq!(chunks[2].pause_after, BLOCK_PAUSE);
    }
}
