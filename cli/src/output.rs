//! `-o table|json|yaml`: a table for people, JSON and YAML for scripts (the
//! API's response as read, so `jq` paths match the API's documentation).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{CliError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// `text` with its control characters written out (`\u{1b}`, `\n`), for a
/// terminal: a job's error or a task's `last_error` quotes what a provider
/// or a client sent, and an escape sequence in it would otherwise act on
/// the terminal of whoever lists the jobs (kubectl had the same hole:
/// CVE-2021-25743). A line break would also break a table's row.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Columns aligned on the widest cell, separated by three spaces, headers
/// in capitals: the layout of `kubectl get`. (Our tables are a few short
/// columns; a table crate would bring borders and wrapping we don't use.)
/// Cells are [`printable`].
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    for row in std::iter::once(&headers).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Print `value` as JSON or YAML, or, for tables, what `table` renders.
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    let text = match format {
        Format::Table => table(value),
        Format::Json => {
            let mut json = serde_json::to_string_pretty(value).map_err(internal)?;
            json.push('\n');
            json
        }
        Format::Yaml => serde_yaml_ng::to_string(value).map_err(internal)?,
    };
    write_stdout(text.as_bytes())
}

/// Whether stdout's reader is still there after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Reader {
    Present,
    Gone,
}

/// Write `bytes` to stdout. A reader that has gone (`backlog jobs list |
/// head`) ends the output quietly, as it does for any Unix tool: `print!`
/// would panic (Rust ignores SIGPIPE, so the write fails with EPIPE).
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    write_stdout_for(bytes).map(|_| ())
}

/// [`write_stdout`], telling whether the reader is still there: a stream
/// stops producing what nobody reads.
pub fn write_stdout_for(bytes: &[u8]) -> Result<Reader> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(Reader::Present),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Reader::Gone),
        Err(e) => Err(CliError::file("writing", "stdout")(e)),
    }
}

fn internal(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("could not render the output: {e}"))
}

/// `45s`, `3m12s`, `2h5m`, `4d3h`: an age or a duration, as kubectl shows them.
pub fn duration(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A duration with tenths under a minute (`2.4s`), for live progress.
pub fn elapsed(d: chrono::Duration) -> String {
    let ms = d.num_milliseconds().max(0);
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        duration(d)
    }
}

pub fn age(at: DateTime<Utc>) -> String {
    duration(Utc::now() - at)
}

/// `512 B`, `12.3 KiB`, `4.0 MiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell_and_trim_line_ends() {
        let rows = vec![
            vec!["text_generation".into(), "3".into(), "".into()],
            vec!["pdf".into(), "12".into(), "x".into()],
        ];
        assert_eq!(
            table(&["task type", "pending", "note"], &rows),
            "TASK TYPE         PENDING   NOTE\n\
             text_generation   3\n\
             pdf               12        x\n"
        );
    }

    #[test]
    fn control_characters_are_written_out_not_sent_to_the_terminal() {
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            printable("HTTP 500: \u{1b}]0;owned\u{7}\u{1b}[2Jgone\r\nnext"),
            "HTTP 500: \\u{1b}]0;owned\\u{7}\\u{1b}[2Jgone\\r\\nnext"
        );
        let rows = vec![vec!["a\nb".to_string(), "\u{1b}[31mred".to_string()]];
        assert_eq!(table(&["x", "y"], &rows), "X      Y\na\\nb   \\u{1b}[31mred\n");
    }

    #[test]
    fn durations_and_sizes_read_as_kubectl_and_ls_h_show_them() {
        let secs = chrono::Duration::seconds;
        assert_eq!(
            [secs(5), secs(192), secs(7500), secs(3 * 86_400 + 7200)].map(duration),
            ["5s", "3m12s", "2h5m", "3d2h"]
        );
        assert_eq!(elapsed(chrono::Duration::milliseconds(2449)), "2.4s");
        assert_eq!(
            [0, 1023, 1536, 5 << 20].map(bytes),
            ["0 B", "1023 B", "1.5 KiB", "5.0 MiB"]
        );
    }
}
