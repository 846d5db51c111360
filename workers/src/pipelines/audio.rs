//! The audio pipeline: a [`Document`] spoken by a TTS provider, chunk by
//! chunk, joined with pauses and encoded as MP3.
//!
//! Settings (read by [`Narrator::from_env`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `TTS_PROVIDER` | `espeak` (default) or `runpod` |
//! | `ESPEAK_VOICE` | espeak-ng voice when the job names none, default `en-us` |
//! | `RUNPOD_API_KEY`, `RUNPOD_ENDPOINT_ID` | required for `runpod` |
//! | `VOICE_SAMPLE_URL` | optional reference recording passed to the RunPod handler |
//! | `RUNPOD_BASE_URL` | API root, default `https://api.runpod.ai/v2` |
//! | `RUNPOD_TIMEOUT_SECONDS` | per RunPod job, queueing included, default 600 |
//! | `TTS_CONCURRENCY` | chunks synthesised at once; default the CPU count for espeak, 4 for RunPod |

mod chunks;
mod espeak;
mod pcm;
mod runpod;

use std::time::Duration;

use futures::StreamExt;
use mp3lame_encoder::{Bitrate, Builder, FlushGap, Mode, MonoPcm, Quality};

pub use self::chunks::{spoken_chunks, SpokenChunk, BLOCK_PAUSE, SENTENCE_PAUSE};
pub use self::espeak::Espeak;
pub use self::pcm::Pcm;
pub use self::runpod::{RunPodClient, RunPodConfig};
use super::document::Document;
use crate::http::Secret;
use crate::{Error, Result};

/// The content type of [`Narration::bytes`].
pub const MP3_CONTENT_TYPE: &str = "audio/mpeg";

/// Speech as a single MP3.
#[derive(Clone, PartialEq)]
pub struct Narration {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub duration_seconds: f64,
    pub sample_rate: u32,
    /// Pieces the text was synthesised in.
    pub chunks: usize,
}

// The bytes are summarised: a failing test or a log line should not dump megabytes.
impl std::fmt::Debug for Narration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Narration")
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .field("content_type", &self.content_type)
            .field("duration_seconds", &self.duration_seconds)
            .field("sample_rate", &self.sample_rate)
            .field("chunks", &self.chunks)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub enum TtsProvider {
    Espeak(Espeak),
    RunPod(RunPodClient),
}

impl TtsProvider {
    pub fn name(&self) -> &'static str {
        match self {
            TtsProvider::Espeak(_) => "espeak",
            TtsProvider::RunPod(_) => "runpod",
        }
    }

    /// Speaks one chunk.
    pub async fn synthesize(&self, text: &str, voice: Option<&str>) -> Result<Pcm> {
        match self {
            TtsProvider::Espeak(espeak) => espeak.synthesize(text, voice).await,
            TtsProvider::RunPod(runpod) => runpod.synthesize(text, voice).await,
        }
    }

    /// The longest chunk sent at once. espeak-ng takes any length, so its
    /// chunks are sized for parallelism; neural models behind RunPod tend to
    /// degrade or refuse past a few hundred characters.
    fn max_chunk_chars(&self) -> usize {
        match self {
            TtsProvider::Espeak(_) => 600,
            TtsProvider::RunPod(_) => 300,
        }
    }
}

/// Turns documents into speech with one provider.
#[derive(Debug, Clone)]
pub struct Narrator {
    provider: TtsProvider,
    concurrency: usize,
}

impl Narrator {
    /// `concurrency` bounds the chunks being synthesised at once (at least 1).
    pub fn new(provider: TtsProvider, concurrency: usize) -> Self {
        Narrator {
            provider,
            concurrency: concurrency.max(1),
        }
    }

    /// The narrator the `TTS_*`/`RUNPOD_*` variables describe (see the module docs).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let require =
            |name: &str| get(name).ok_or_else(|| Error::Config(format!("TTS_PROVIDER=runpod needs {name}")));
        let number = |name: &str| -> Result<Option<u64>> {
            get(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| Error::Config(format!("{name}={v:?} is not a whole number")))
                })
                .transpose()
        };
        let (provider, default_concurrency) = match get("TTS_PROVIDER").as_deref().unwrap_or("espeak") {
            "espeak" => {
                let mut espeak = Espeak::default();
                if let Some(voice) = get("ESPEAK_VOICE") {
                    espeak.default_voice = voice;
                }
                let cpus = std::thread::available_parallelism().map_or(1, usize::from);
                (TtsProvider::Espeak(espeak), cpus)
            }
            "runpod" => {
                let mut config = RunPodConfig::new(
                    require("RUNPOD_ENDPOINT_ID")?,
                    Secret::new(require("RUNPOD_API_KEY")?),
                );
                config.voice_sample_url = get("VOICE_SAMPLE_URL");
                if let Some(base) = get("RUNPOD_BASE_URL") {
                    config.base_url = base;
                }
                if let Some(seconds) = number("RUNPOD_TIMEOUT_SECONDS")? {
                    config.job_timeout = Duration::from_secs(seconds);
                }
                (TtsProvider::RunPod(RunPodClient::new(config)?), 4)
            }
            other => {
                return Err(Error::Config(format!(
                    "TTS_PROVIDER={other:?} is not one of espeak, runpod"
                )))
            }
        };
        let concurrency = number("TTS_CONCURRENCY")?.map_or(default_concurrency, |n| n as usize);
        Ok(Narrator::new(provider, concurrency))
    }

    pub fn provider(&self) -> &TtsProvider {
        &self.provider
    }

    /// The voice for a job: the one it names, else (espeak-ng only: RunPod
    /// voices are the endpoint's own) one that speaks its language, else
    /// `None`, the provider's default. Without it a Greek text was read by
    /// the English voice, letter name by letter name.
    pub async fn voice_for(&self, voice: Option<&str>, lang: Option<&str>) -> Option<String> {
        if let Some(voice) = voice {
            return Some(voice.to_owned());
        }
        let (TtsProvider::Espeak(espeak), Some(lang)) = (&self.provider, lang) else {
            return None;
        };
        let found = espeak.voice_for_language(lang).await;
        if found.is_none() {
            tracing::warn!(lang, voice = %espeak.default_voice, "espeak-ng has no voice for the job's language; the default voice reads it");
        }
        found
    }

    /// Speaks `document` (title, headings, paragraphs, list items) in `voice`
    /// or the provider's default, and encodes the result as MP3.
    pub async fn narrate(&self, document: &Document, voice: Option<&str>) -> Result<Narration> {
        let chunks = spoken_chunks(document, self.provider.max_chunk_chars());
        if chunks.iter().all(|c| c.text.trim().is_empty()) {
            return Err(Error::InvalidInput("the text has nothing to speak".into()));
        }
        // `buffered` keeps the order of the chunks while up to `concurrency`
        // run; the first failure stops the rest (espeak children are killed on drop).
        // Owned pieces, not `&chunks`: a stream over borrowed items makes the
        // future fail the `Send` bound the worker runtime needs.
        let pieces: Vec<(String, Duration)> =
            chunks.iter().map(|c| (c.text.clone(), c.pause_after)).collect();
        let mut spoken = futures::stream::iter(pieces)
            .map(|(text, pause_after)| async move {
                let pcm = self.provider.synthesize(&text, voice).await?;
                Ok::<_, Error>((pcm, pause_after))
            })
            .buffered(self.concurrency);
        // Each piece is encoded as it arrives, in order, and dropped: a long
        // text's samples (about 2.7 kB a character with espeak-ng, pauses
        // included) are never held whole, only the MP3 (about a fifth of
        // that) and the pieces in flight.
        let mut writer: Option<Mp3Writer> = None;
        let mut pause_before = Duration::ZERO;
        while let Some(piece) = spoken.next().await {
            let (pcm, pause_after) = piece?;
            let mut current = match writer.take() {
                Some(writer) => writer,
                None => Mp3Writer::new(pcm.sample_rate)?,
            };
            // Encoding is CPU-bound: off the async threads.
            current = tokio::task::spawn_blocking(move || {
                current.silence(pause_before)?;
                current.push_piece(&pcm)?;
                Ok::<_, Error>(current)
            })
            .await
            .map_err(|e| Error::Audio(format!("encoding thread failed: {e}")))??;
            writer = Some(current);
            pause_before = pause_after;
        }
        let writer = writer.ok_or_else(|| Error::Audio("the provider returned no speech".into()))?;
        let sample_rate = writer.sample_rate;
        let duration_seconds = writer.duration().as_secs_f64();
        let bytes = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| Error::Audio(format!("encoding thread failed: {e}")))??;
        Ok(Narration {
            bytes,
            content_type: MP3_CONTENT_TYPE,
            duration_seconds,
            sample_rate,
            chunks: chunks.len(),
        })
    }
}

/// MP3 written as speech arrives, piece by piece. MP3 because every
/// player, browser and phone opens it. LAME is compiled from the source the
/// `mp3lame-sys` crate vendors (a C compiler and `make` are all it needs),
/// so the binary carries its encoder and the machines need no extra
/// package. Constant 64 kbit/s mono is ample for speech, and the LAME tag
/// at the front lets players show the exact duration.
struct Mp3Writer {
    encoder: mp3lame_encoder::Encoder,
    mp3: Vec<u8>,
    sample_rate: u32,
    samples: u64,
}

impl Mp3Writer {
    fn new(sample_rate: u32) -> Result<Self> {
        let mut builder = Builder::new().ok_or_else(|| Error::Audio("MP3 encoder: out of memory".into()))?;
        builder
            .set_num_channels(1)
            .map_err(|e| mp3_error("channels", &e))?;
        builder
            .set_sample_rate(sample_rate)
            .map_err(|e| mp3_error("sample rate", &e))?;
        builder.set_mode(Mode::Mono).map_err(|e| mp3_error("mode", &e))?;
        builder
            .set_brate(Bitrate::Kbps64)
            .map_err(|e| mp3_error("bitrate", &e))?;
        builder
            .set_quality(Quality::Good)
            .map_err(|e| mp3_error("quality", &e))?;
        let encoder = builder.build().map_err(|e| mp3_error("setup", &e))?;
        Ok(Mp3Writer {
            encoder,
            mp3: Vec::new(),
            sample_rate,
            samples: 0,
        })
    }

    fn push(&mut self, samples: &[i16]) -> Result<()> {
        self.mp3
            .reserve(mp3lame_encoder::max_required_buffer_size(samples.len()));
        self.encoder
            .encode_to_vec(MonoPcm(samples), &mut self.mp3)
            .map_err(|e| mp3_error("encoding", &e))?;
        self.samples += samples.len() as u64;
        Ok(())
    }

    /// A piece of speech. All pieces share the writer's sample rate: they
    /// come from one voice.
    fn push_piece(&mut self, pcm: &Pcm) -> Result<()> {
        if pcm.sample_rate != self.sample_rate {
            return Err(Error::Audio(format!(
                "the provider returned chunks at {} Hz and {} Hz",
                self.sample_rate, pcm.sample_rate
            )));
        }
        self.push(&pcm.samples)
    }

    /// `pause` of silence, in blocks: a long pause allocates no more than one.
    fn silence(&mut self, pause: Duration) -> Result<()> {
        const BLOCK: usize = 8192;
        let mut left = (pause.as_secs_f64() * f64::from(self.sample_rate)).round() as usize;
        let zeros = [0i16; BLOCK];
        while left > 0 {
            let n = left.min(BLOCK);
            self.push(&zeros[..n])?;
            left -= n;
        }
        Ok(())
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples as f64 / f64::from(self.sample_rate.max(1)))
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        // LAME asks for up to 7200 bytes of room to flush into. The flush pads
        // and encodes the samples LAME still holds (its "no gap" flush only
        // empties the bitstream, for files played back to back, and cut the
        // end off every file) and records the padding in the LAME tag.
        self.mp3.reserve(7200);
        self.encoder
            .flush_to_vec::<FlushGap>(&mut self.mp3)
            .map_err(|e| mp3_error("flush", &e))?;
        // LAME reserved the first frame for this tag; fill it in now the length is known.
        let mut tag = Vec::with_capacity(self.encoder.lame_tag_size());
        if self.encoder.lame_tag_encode_to_vec(&mut tag).is_some() && tag.len() <= self.mp3.len() {
            self.mp3[..tag.len()].copy_from_slice(&tag);
        }
        Ok(self.mp3)
    }
}

fn mp3_error(what: &str, e: &dyn std::fmt::Debug) -> Error {
    Error::Audio(format!("MP3 {what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(sample_rate: u32, samples: usize) -> Pcm {
        Pcm {
            sample_rate,
            samples: (0..samples)
                .map(|i| ((i as f64 * 0.05).sin() * 8000.0) as i16)
                .collect(),
        }
    }

    fn encode_mp3(pcm: &Pcm) -> Result<Vec<u8>> {
        let mut writer = Mp3Writer::new(pcm.sample_rate)?;
        writer.push(&pcm.samples)?;
        writer.finish()
    }

    #[test]
    fn the_writer_counts_speech_and_pauses_as_they_are_written() {
        let mut writer = Mp3Writer::new(22050).unwrap();
        writer.push_piece(&tone(22050, 100)).unwrap();
        writer.silence(Duration::from_millis(500)).unwrap();
        writer.push_piece(&tone(22050, 100)).unwrap();
        assert!(
            writer.push_piece(&tone(44100, 1)).is_err(),
            "a piece at another sample rate"
        );
        assert_eq!(writer.samples, 100 + 11025 + 100);
        assert!((writer.duration().as_secs_f64() - 11225.0 / 22050.0).abs() < 1e-9);
        let decoded = decoded_samples(&writer.finish().unwrap());
        assert!(
            (decoded.len() as i64 - 11225).abs() < 22050 * 3 / 100,
            "{}",
            decoded.len()
        );
    }

    #[test]
    fn mp3_output_starts_with_a_frame_and_scales_with_length() {
        let short = encode_mp3(&tone(22050, 22050)).unwrap();
        let long = encode_mp3(&tone(22050, 22050 * 4)).unwrap();
        // An MPEG audio frame sync: eleven set bits.
        assert_eq!((short[0], short[1] & 0xE0), (0xFF, 0xE0));
        // 64 kbit/s ≈ 8 kB a second.
        assert!((6_000..12_000).contains(&short.len()), "{}", short.len());
        assert!(long.len() > short.len() * 3);
    }

    /// Every sample decoded from `mp3` (gapless: the encoder's delay and
    /// padding, as the LAME tag gives them, taken off), as f32.
    fn decoded_samples(mp3: &[u8]) -> Vec<f32> {
        use symphonia::core::audio::SampleBuffer;
        use symphonia::core::formats::FormatOptions;
        let source = symphonia::core::io::MediaSourceStream::new(
            Box::new(std::io::Cursor::new(mp3.to_vec())),
            Default::default(),
        );
        let mut hint = symphonia::core::probe::Hint::new();
        hint.with_extension("mp3");
        let options = FormatOptions {
            enable_gapless: true,
            ..Default::default()
        };
        let mut format = symphonia::default::get_probe()
            .format(&hint, source, &options, &Default::default())
            .unwrap()
            .format;
        let track = format.default_track().unwrap().clone();
        let mut decoder = symphonia::default::get_codecs()
            .make(&track.codec_params, &Default::default())
            .unwrap();
        let mut samples = Vec::new();
        while let Ok(packet) = format.next_packet() {
            let decoded = decoder.decode(&packet).unwrap();
            let mut buffer = SampleBuffer::<f32>::new(decoded.capacity() as u64, *decoded.spec());
            buffer.copy_interleaved_ref(decoded);
            samples.extend_from_slice(buffer.samples());
        }
        samples
    }

    /// Speech that ends on its last sample (neural TTS trims its silence)
    /// keeps its end: LAME holds the last ~1,500 samples until a flush
    /// that pads and encodes them; the flush used before only emptied the
    /// bitstream, cutting 60–90 ms off every file.
    #[test]
    fn the_mp3_keeps_the_speech_to_its_last_sample() {
        let pcm = tone(22050, 22050);
        let decoded = decoded_samples(&encode_mp3(&pcm).unwrap());
        let missing = pcm.samples.len() as i64 - decoded.len() as i64;
        assert!(missing.abs() < 22050 * 3 / 100, "{missing} samples lost or added");
        let last_50_ms = &decoded[decoded.len() - 1102..];
        let rms = (last_50_ms.iter().map(|s| s * s).sum::<f32>() / last_50_ms.len() as f32).sqrt();
        assert!(rms > 0.05, "the last 50 ms are silent (rms {rms})");
    }

    #[test]
    fn providers_from_variables() {
        let narrator = |vars: &[(&str, &str)]| {
            let vars: std::collections::HashMap<String, String> =
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Narrator::from_lookup(|name| vars.get(name).cloned())
        };
        let default = narrator(&[]).unwrap();
        assert_eq!(default.provider().name(), "espeak");
        assert!(default.concurrency >= 1);

        assert!(matches!(
            narrator(&[("TTS_PROVIDER", "runpod")]),
            Err(Error::Config(_))
        ));
        let runpod = narrator(&[
            ("TTS_PROVIDER", "runpod"),
            ("RUNPOD_API_KEY", "rp-secret"),
            ("RUNPOD_ENDPOINT_ID", "abc123"),
            ("TTS_CONCURRENCY", "2"),
        ])
        .unwrap();
        assert_eq!(runpod.provider().name(), "runpod");
        assert_eq!(runpod.concurrency, 2);
        assert!(!format!("{runpod:?}").contains("rp-secret"));
        assert!(matches!(
            narrator(&[("TTS_PROVIDER", "say")]),
            Err(Error::Config(_))
        ));
    }
}
