//! Mono 16-bit PCM: what every TTS provider's WAV is reduced to, joined and
//! handed to the encoder.

use std::time::Duration;

/// Mono signed 16-bit samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcm {
    pub sample_rate: u32,
    pub samples: Vec<i16>,
}

impl Pcm {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples.len() as f64 / f64::from(self.sample_rate.max(1)))
    }

    /// Reads a WAV file: integer PCM (8/16/24/32-bit) or 32-bit float, any
    /// channel count (averaged to mono). A data chunk whose declared length
    /// runs past the end is read to the end, because programs that stream WAV
    /// to a pipe (espeak-ng `--stdout`) cannot go back to fill the length in.
    pub fn from_wav(wav: &[u8]) -> Result<Pcm, String> {
        if wav.len() < 12 || &wav[0..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
            return Err("not a RIFF/WAVE file".into());
        }
        let mut format: Option<WavFormat> = None;
        let mut rest = &wav[12..];
        while rest.len() >= 8 {
            let id = &rest[0..4];
            let declared = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
            let body = &rest[8..];
            let size = declared.min(body.len());
            match id {
                b"fmt " => format = Some(WavFormat::parse(&body[..size])?),
                b"data" => {
                    let format = format.ok_or("data chunk before fmt chunk")?;
                    return format.decode(&body[..size]);
                }
                _ => {}
            }
            // Chunks are padded to an even length.
            rest = body.get(size + (size & 1)..).unwrap_or_default();
        }
        Err("no data chunk".into())
    }
}

#[derive(Debug, Clone, Copy)]
struct WavFormat {
    float: bool,
    channels: usize,
    sample_rate: u32,
    bits: u16,
}

impl WavFormat {
    fn parse(fmt: &[u8]) -> Result<Self, String> {
        if fmt.len() < 16 {
            return Err("fmt chunk too short".into());
        }
        let u16_at = |i: usize| u16::from_le_bytes([fmt[i], fmt[i + 1]]);
        let mut tag = u16_at(0);
        // WAVE_FORMAT_EXTENSIBLE keeps the real format in its sub-format GUID.
        if tag == 0xFFFE && fmt.len() >= 26 {
            tag = u16_at(24);
        }
        let format = WavFormat {
            float: tag == 3,
            channels: usize::from(u16_at(2)),
            sample_rate: u32::from_le_bytes(fmt[4..8].try_into().expect("4 bytes")),
            bits: u16_at(14),
        };
        let supported = match tag {
            1 => matches!(format.bits, 8 | 16 | 24 | 32),
            3 => format.bits == 32,
            _ => false,
        };
        if !supported || format.channels == 0 || format.sample_rate == 0 {
            return Err(format!(
                "unsupported WAV encoding (format tag {tag}, {} bits, {} channels, {} Hz)",
                format.bits, format.channels, format.sample_rate
            ));
        }
        Ok(format)
    }

    fn decode(self, data: &[u8]) -> Result<Pcm, String> {
        let width = usize::from(self.bits / 8);
        let frame = width * self.channels;
        let sample = |s: &[u8]| -> i32 {
            match (self.float, width) {
                (true, _) => {
                    let v = f32::from_le_bytes(s.try_into().expect("4 bytes"));
                    (v.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i32
                }
                (false, 1) => (i32::from(s[0]) - 128) << 8,
                (false, 2) => i32::from(i16::from_le_bytes([s[0], s[1]])),
                (false, 3) => i32::from(i16::from_le_bytes([s[1], s[2]])),
                (false, _) => i32::from(i16::from_le_bytes([s[2], s[3]])),
            }
        };
        let channels = self.channels as i32;
        let samples = data
            .chunks_exact(frame)
            .map(|f| (f.chunks_exact(width).map(sample).sum::<i32>() / channels) as i16)
            .collect();
        Ok(Pcm {
            sample_rate: self.sample_rate,
            samples,
        })
    }
}

#[cfg(test)]
pub(crate) fn wav_bytes(sample_rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&channels.to_le_bytes());
    wav.extend_from_slice(&sample_rate.to_le_bytes());
    wav.extend_from_slice(&(sample_rate * 2 * u32::from(channels)).to_le_bytes());
    wav.extend_from_slice(&(2 * channels).to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        wav.extend_from_slice(&s.to_le_bytes());
    }
    wav
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pcm16_and_downmixes_stereo() {
        let mono = Pcm::from_wav(&wav_bytes(22050, 1, &[1, -2, 300])).unwrap();
        assert_eq!(
            mono,
            Pcm {
                sample_rate: 22050,
                samples: vec![1, -2, 300]
            }
        );

        let stereo = Pcm::from_wav(&wav_bytes(48000, 2, &[100, 300, -10, -30])).unwrap();
        assert_eq!(stereo.samples, vec![200, -20]);
    }

    #[test]
    fn reads_a_streamed_wav_with_a_placeholder_length() {
        let mut wav = wav_bytes(22050, 1, &[5, 6, 7]);
        let data_len_at = wav.len() - 6 - 4;
        wav[data_len_at..data_len_at + 4].copy_from_slice(&0x7fff_f000u32.to_le_bytes());
        assert_eq!(Pcm::from_wav(&wav).unwrap().samples, vec![5, 6, 7]);
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert!(Pcm::from_wav(b"ID3\x03 not a wav").is_err());
        let mut adpcm = wav_bytes(8000, 1, &[0; 4]);
        adpcm[20] = 2; // format tag 2: MS ADPCM
        assert!(Pcm::from_wav(&adpcm).unwrap_err().contains("unsupported"));
    }

    #[test]
    fn duration_follows_sample_count() {
        let pcm = Pcm {
            sample_rate: 8000,
            samples: vec![0; 12000],
        };
        assert_eq!(pcm.duration(), Duration::from_millis(1500));
    }
}
