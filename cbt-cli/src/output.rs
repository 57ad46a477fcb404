//! Output of the `cbt` command: human text or exactly one JSON document on stdout, and a
//! progress bar on stderr when it is a terminal.

use std::io::IsTerminal;
use std::sync::Arc;

use cbt_core::text::Escaped;
use cbt_store::engine::{Progress, ProgressFn};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::CliError;

/// `-o` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Text for people.
    Human,
    /// One JSON document on stdout (errors too), for scripts.
    Json,
}

/// Where results go.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Selected format.
    pub format: Format,
}

impl Output {
    /// True for `-o json`.
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }

    /// Prints the result: `human` for people, `doc` as JSON.
    pub fn emit<T: Serialize>(&self, doc: &T, human: impl FnOnce() -> String) {
        match self.format {
            Format::Json => match serde_json::to_string_pretty(doc) {
                Ok(s) => println!("{s}"),
                Err(e) => eprintln!("error: cannot encode the result as JSON: {e}"),
            },
            Format::Human => {
                let text = human();
                if !text.is_empty() {
                    println!("{}", text.trim_end());
                }
            }
        }
    }

    /// Prints a failure (stderr for people; the JSON document on stdout for scripts).
    pub fn error(&self, e: &CliError) {
        match self.format {
            Format::Json if e.reported => {}
            Format::Json => {
                let doc = serde_json::json!({ "error": e.to_json() });
                println!("{doc:#}");
            }
            Format::Human => {
                // Messages quote repository text (lock holders, names in decode errors):
                // never let it reach the terminal raw.
                eprintln!("error: {}", Escaped(&e.message));
                if let Some(h) = &e.hint {
                    eprintln!("hint: {}", Escaped(h));
                }
            }
        }
    }

    /// A progress bar and the engine callback feeding it, when stderr is a terminal and the
    /// output is for people; `None` otherwise (no escape codes in logs or pipes).
    pub fn progress(&self, what: &str) -> Option<(ProgressBar, ProgressFn)> {
        if self.json() || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(what.to_string());
        let b = bar.clone();
        let cb: ProgressFn = Arc::new(move |p: &Progress| {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
        });
        Some((bar, cb))
    }
}

/// Bytes in binary units for people (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
