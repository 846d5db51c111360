//! What a job's `input` holds, per job type: one contract for everything
//! that writes it (the API, `enqueue`) and everything that reads it (the
//! workers' pipelines). Unknown fields are refused when a job is created,
//! so a field the workers read is a field clients may send.

use serde::{Deserialize, Deserializer, Serialize};

use crate::JobType;

/// Input of `reading` and `text` jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PromptInput {
    /// What to write about: not blank, no NUL characters.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Voice for the audio of a `reading` job: see [`check_voice`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "voice_name"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^[A-Za-z0-9][A-Za-z0-9_+.-]*(/[A-Za-z0-9][A-Za-z0-9_+.-]*)*$",
            max_length = 64
        )
    )]
    pub voice: Option<String>,
    /// The document's language, an ISO 639 code with an optional region
    /// (`el`, `en-GB`): the language the text is written in, its PDF's
    /// hyphenation and typesetting, and (espeak-ng, no `voice`) the voice
    /// that reads it. English when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "language_tag"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$")
    )]
    pub lang: Option<String>,
}

/// Input of `pdf` and `audiobook` jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TextInput {
    /// The text to typeset or read aloud: not blank, no NUL characters.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// As [`PromptInput::voice`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "voice_name"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^[A-Za-z0-9][A-Za-z0-9_+.-]*(/[A-Za-z0-9][A-Za-z0-9_+.-]*)*$",
            max_length = 64
        )
    )]
    pub voice: Option<String>,
    /// As [`PromptInput::lang`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "language_tag"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*$")
    )]
    pub lang: Option<String>,
}

/// A job's input; which one depends on the job type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum JobInput {
    Prompt(PromptInput),
    Text(TextInput),
}

/// Which input a job type takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Prompt,
    Text,
}

impl JobType {
    pub fn input_kind(self) -> InputKind {
        match self {
            JobType::Reading | JobType::Text => InputKind::Prompt,
            JobType::Pdf | JobType::Audiobook => InputKind::Text,
        }
    }
}

impl JobInput {
    /// The input of a job of `job_type`, checked: unknown fields, missing
    /// ones and a malformed `lang` are errors.
    pub fn parse(job_type: JobType, input: &serde_json::Value) -> Result<JobInput, serde_json::Error> {
        Ok(match job_type.input_kind() {
            InputKind::Prompt => JobInput::Prompt(PromptInput::deserialize(input)?),
            InputKind::Text => JobInput::Text(TextInput::deserialize(input)?),
        })
    }

    /// What to write about, for jobs that take a prompt.
    pub fn prompt(&self) -> Option<&str> {
        match self {
            JobInput::Prompt(p) => Some(&p.prompt),
            JobInput::Text(_) => None,
        }
    }

    /// The text given, for jobs that take one.
    pub fn text(&self) -> Option<&str> {
        match self {
            JobInput::Prompt(_) => None,
            JobInput::Text(t) => Some(&t.text),
        }
    }

    pub fn title(&self) -> Option<&str> {
        match self {
            JobInput::Prompt(p) => p.title.as_deref(),
            JobInput::Text(t) => t.title.as_deref(),
        }
    }

    pub fn voice(&self) -> Option<&str> {
        match self {
            JobInput::Prompt(p) => p.voice.as_deref(),
            JobInput::Text(t) => t.voice.as_deref(),
        }
    }

    pub fn lang(&self) -> Option<&str> {
        match self {
            JobInput::Prompt(p) => p.lang.as_deref(),
            JobInput::Text(t) => t.lang.as_deref(),
        }
    }
}

/// The primary language subtag of `tag` (`en-GB` → `en`), lowercased, or
/// why it is not one: two or three letters, then optional subtags.
pub fn primary_language(tag: &str) -> Result<String, String> {
    let mut subtags = tag.trim().split(['-', '_']);
    let primary = subtags.next().unwrap_or_default().to_ascii_lowercase();
    let primary_ok = (2..=3).contains(&primary.len()) && primary.bytes().all(|b| b.is_ascii_lowercase());
    let rest_ok = subtags.all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()));
    if primary_ok && rest_ok {
        Ok(primary)
    } else {
        Err(format!(
            "{tag:?} is not an ISO 639 language code (two or three letters, optionally with a region: el, en-GB)"
        ))
    }
}

/// Whether `voice` can name a voice, or why not: up to 64 characters,
/// `/`-separated parts of letters, digits and `-_+.`, each starting with a
/// letter or digit (`en-us`, `gmw/en-GB-x-rp`, `en+f3`, `alloy`). A voice
/// name reaches a TTS engine that may read it as a path under its voices
/// folder (espeak-ng does), so no part may be `..` or start like an option.
pub fn check_voice(voice: &str) -> Result<(), String> {
    let part_ok = |part: &str| {
        part.starts_with(|c: char| c.is_ascii_alphanumeric())
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c))
    };
    if voice.len() <= 64 && voice.split('/').all(part_ok) {
        Ok(())
    } else {
        Err(format!(
            "{voice:?} is not a voice name (up to 64 letters, digits and -_+. in /-separated parts, each starting with a letter or digit: en-us, gmw/en-GB-x-rp)"
        ))
    }
}

fn voice_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let voice = Option::<String>::deserialize(deserializer)?;
    if let Some(voice) = &voice {
        check_voice(voice).map_err(serde::de::Error::custom)?;
    }
    Ok(voice)
}

fn language_tag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let tag = Option::<String>::deserialize(deserializer)?;
    if let Some(tag) = &tag {
        primary_language(tag).map_err(serde::de::Error::custom)?;
    }
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_job_type_reads_its_own_input() {
        let reading = JobInput::parse(JobType::Reading, &json!({"prompt": "tea", "lang": "el"})).unwrap();
        assert_eq!((reading.prompt(), reading.lang()), (Some("tea"), Some("el")));
        let pdf = JobInput::parse(JobType::Pdf, &json!({"text": "# Tea", "title": "T"})).unwrap();
        assert_eq!(
            (pdf.text(), pdf.title(), pdf.lang()),
            (Some("# Tea"), Some("T"), None)
        );
    }

    #[test]
    fn unknown_fields_and_bad_languages_are_refused() {
        let unknown = JobInput::parse(JobType::Text, &json!({"prompt": "x", "language": "el"})).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `language`"),
            "{unknown}"
        );
        let bad = JobInput::parse(JobType::Pdf, &json!({"text": "x", "lang": "english"})).unwrap_err();
        assert!(bad.to_string().contains("not an ISO 639 language code"), "{bad}");
        assert!(JobInput::parse(JobType::Pdf, &json!({"prompt": "x"})).is_err());
    }

    #[test]
    fn primary_language_subtags() {
        assert_eq!(primary_language("en-GB").unwrap(), "en");
        assert_eq!(primary_language("EL").unwrap(), "el");
        assert_eq!(primary_language("zh_Hant_TW").unwrap(), "zh");
        assert!(primary_language("1a").is_err());
        assert!(primary_language("en-").is_err());
        assert!(primary_language("").is_err());
    }
}
