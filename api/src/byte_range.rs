//! `Range: bytes=…` requests (RFC 9110 §14) for one range, which is what
//! audio players send. Requests for several ranges get the whole object:
//! a server may ignore `Range`, and multipart answers buy players nothing.

use std::ops::Range;

/// What to send for a `Range` header against an object of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send everything with 200.
    Full,
    /// Send these bytes with 206.
    Partial(Range<u64>),
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

pub fn resolve(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let parse = |s: &str| -> Option<Option<u64>> {
        let s = s.trim();
        if s.is_empty() {
            Some(None)
        } else if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok().map(Some)
        } else {
            None
        }
    };
    let (Some(first), Some(last)) = (parse(first), parse(last)) else {
        // Syntactically invalid: ignored, as the RFC allows.
        return RangeRequest::Full;
    };
    match (first, last) {
        // `bytes=-N`: the last N bytes.
        (None, Some(suffix)) => {
            if suffix == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial(size.saturating_sub(suffix)..size)
            }
        }
        (Some(start), last) => {
            if last.is_some_and(|last| last < start) {
                RangeRequest::Full
            } else if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                let end = last.map_or(size, |last| last.saturating_add(1).min(size));
                RangeRequest::Partial(start..end)
            }
        }
        (None, None) => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::*;
    use super::*;

    #[test]
    fn single_ranges_resolve_against_the_size() {
        assert_eq!(resolve(Some("bytes=0-9"), 100), Partial(0..10));
        assert_eq!(resolve(Some("bytes=90-"), 100), Partial(90..100));
        assert_eq!(resolve(Some("bytes=90-500"), 100), Partial(90..100));
        assert_eq!(resolve(Some("bytes=-10"), 100), Partial(90..100));
        assert_eq!(resolve(Some("bytes=-500"), 100), Partial(0..100));
        assert_eq!(resolve(Some("bytes=99-99"), 100), Partial(99..100));
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        assert_eq!(resolve(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn absent_invalid_and_multiple_ranges_mean_the_whole_object() {
        for header in [
            None,
            Some("items=0-1"),
            Some("bytes=abc"),
            Some("bytes=5-1"),
            Some("bytes=0-1,5-6"),
            Some("bytes=-"),
            Some("bytes=+1-2"),
        ] {
            assert_eq!(resolve(header, 100), Full, "{header:?}");
        }
    }
}
