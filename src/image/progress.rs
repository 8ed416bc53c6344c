//! Pull/push progress: a bar per layer on a terminal, plain lines otherwise, nothing when quiet.

use crate::manifest::units::human_bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

#[derive(Clone)]
pub enum Progress {
    Quiet,
    Lines,
    Bars(MultiProgress),
}

impl Progress {
    /// Bars on a TTY stderr, plain lines otherwise; nothing with `quiet`.
    pub fn auto(quiet: bool) -> Progress {
        if quiet {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            Progress::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines
        }
    }

    pub fn layer(&self, digest: &str, size: u64) -> LayerProgress {
        let short = short_digest(digest);
        match self {
            Progress::Bars(m) => {
                let pb = m.add(ProgressBar::new(size));
                let style = ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                pb.set_style(style);
                pb.set_prefix(short);
                LayerProgress::Bar(pb)
            }
            Progress::Lines => LayerProgress::Line {
                short,
                size,
                start: std::time::Instant::now(),
            },
            Progress::Quiet => LayerProgress::None,
        }
    }

    pub fn message(&self, msg: &str) {
        match self {
            Progress::Bars(m) => {
                let _ = m.println(msg);
            }
            Progress::Lines => eprintln!("{msg}"),
            Progress::Quiet => {}
        }
    }
}

pub enum LayerProgress {
    None,
    Line {
        short: String,
        size: u64,
        start: std::time::Instant,
    },
    Bar(ProgressBar),
}

impl LayerProgress {
    pub fn inc(&self, n: u64) {
        if let LayerProgress::Bar(pb) = self {
            pb.inc(n);
        }
    }

    pub fn reset(&self) {
        if let LayerProgress::Bar(pb) = self {
            pb.set_position(0);
        }
    }

    pub fn finish(&self, what: &str) {
        match self {
            LayerProgress::Bar(pb) => pb.finish_with_message(what.to_string()),
            LayerProgress::Line { short, size, start } => {
                let secs = start.elapsed().as_secs_f64().max(0.001);
                eprintln!(
                    "{short}: {what} ({}, {}/s)",
                    human_bytes(*size),
                    human_bytes((*size as f64 / secs) as u64)
                );
            }
            LayerProgress::None => {}
        }
    }
}

pub fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex.chars().take(12).collect()
}
