//! The table and the JSON file.

use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

use serde_json::{json, Value};

/// What a figure is held to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Goal {
    /// No goal: a figure for the record.
    None,
    /// forkbus / raw at most this.
    RatioAtMost(f64),
    /// forkbus / raw at least this.
    RatioAtLeast(f64),
    /// forkbus's value at least `hi` (met), at least `lo` (partly met).
    ValueAtLeast {
        lo: f64,
        hi: f64,
        what: &'static str,
    },
    /// forkbus's value exactly this.
    ValueEquals(f64),
}

impl Goal {
    fn text(&self) -> String {
        match *self {
            Self::None => "-".into(),
            Self::RatioAtMost(r) => format!("<= {r}x"),
            Self::RatioAtLeast(r) => format!(">= {r}x"),
            Self::ValueAtLeast { lo, hi, what } => {
                format!(">= {what} ({:.1}-{:.1} M/s)", lo / 1e6, hi / 1e6)
            }
            Self::ValueEquals(v) => format!("= {v}"),
        }
    }

    fn met(&self, forkbus: f64, ratio: f64) -> &'static str {
        if !forkbus.is_finite() {
            return "n/a";
        }
        match *self {
            Self::None => "-",
            Self::RatioAtMost(r) if ratio <= r => "yes",
            Self::RatioAtLeast(r) if ratio >= r => "yes",
            Self::ValueAtLeast { hi, .. } if forkbus >= hi => "yes",
            Self::ValueAtLeast { lo, .. } if forkbus >= lo => "partly",
            Self::ValueEquals(v) if (forkbus - v).abs() < 1e-9 => "yes",
            _ => "NO",
        }
    }
}

/// How a value prints.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Unit {
    Micros,
    /// Messages per second; the payload size gives MB/s beside it.
    Rate {
        size: usize,
    },
    Count,
    Kib,
}

impl Unit {
    fn name(&self) -> &'static str {
        match self {
            Self::Micros => "us",
            Self::Rate { .. } => "msgs/s",
            Self::Count => "frames",
            Self::Kib => "KiB",
        }
    }

    pub(crate) fn show(&self, v: f64) -> String {
        if !v.is_finite() {
            return "-".into();
        }
        match *self {
            Self::Micros => format!("{v:.1} us"),
            Self::Rate { size } => {
                let mb = v * size as f64 / 1e6;
                if v >= 1e6 {
                    format!("{:.2} M/s {mb:.0} MB/s", v / 1e6)
                } else {
                    format!("{:.1} k/s {mb:.0} MB/s", v / 1e3)
                }
            }
            Self::Count => format!("{v:.0}"),
            Self::Kib => format!("{v:.0} KiB"),
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) group: &'static str,
    pub(crate) figure: String,
    pub(crate) unit: Unit,
    /// The figure (the median over repetitions).
    pub(crate) forkbus: f64,
    pub(crate) raw: f64,
    pub(crate) goal: Goal,
    /// Every repetition's value.
    pub(crate) forkbus_reps: Vec<f64>,
    pub(crate) raw_reps: Vec<f64>,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(
        group: &'static str,
        figure: impl Into<String>,
        unit: Unit,
        forkbus_reps: Vec<f64>,
        raw_reps: Vec<f64>,
        goal: Goal,
    ) -> Self {
        Self {
            group,
            figure: figure.into(),
            unit,
            forkbus: median(&forkbus_reps),
            raw: median(&raw_reps),
            goal,
            forkbus_reps,
            raw_reps,
            note: String::new(),
        }
    }

    #[must_use]
    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    pub(crate) fn ratio(&self) -> f64 {
        self.forkbus / self.raw
    }

    fn json(&self) -> Value {
        let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "group": self.group,
            "figure": self.figure,
            "unit": self.unit.name(),
            "forkbus": num(self.forkbus),
            "raw": num(self.raw),
            "ratio": num(self.ratio()),
            "goal": self.goal.text(),
            "met": self.goal.met(self.forkbus, self.ratio()),
            "forkbus_reps": self.forkbus_reps.iter().map(|v| num(*v)).collect::<Vec<_>>(),
            "raw_reps": self.raw_reps.iter().map(|v| num(*v)).collect::<Vec<_>>(),
            "note": self.note,
        })
    }
}

/// The median of some values (NaN when empty or when any is NaN).
pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

/// The table, as text.
pub(crate) fn table(rows: &[Row]) -> String {
    let head = ["figure", "forkbus", "raw", "ratio", "goal", "met?"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let ratio = r.ratio();
            [
                r.figure.clone(),
                r.unit.show(r.forkbus),
                r.unit.show(r.raw),
                if ratio.is_finite() {
                    format!("{ratio:.2}x")
                } else {
                    "-".into()
                },
                r.goal.text(),
                r.goal.met(r.forkbus, ratio).into(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        let mut l = String::new();
        for (i, (s, w)) in c.iter().zip(width).enumerate() {
            let pad = w.saturating_sub(s.chars().count());
            if i == 0 {
                let _ = write!(l, "| {s}{} ", " ".repeat(pad));
            } else {
                let _ = write!(l, "| {}{s} ", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push_str(" |\n");
    };
    line(&mut out, &head.map(String::from));
    let rule: Vec<String> = width
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                "-".repeat(*w)
            } else {
                format!("{}:", "-".repeat(w.saturating_sub(1)))
            }
        })
        .collect();
    line(&mut out, &rule);
    for c in &cells {
        line(&mut out, c);
    }
    out
}

/// Rows as JSON.
pub(crate) fn rows_json(rows: &[Row]) -> Value {
    Value::Array(rows.iter().map(Row::json).collect())
}

/// The machine: CPU model and count, kernel, memory.
pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let hypervisor = cpuinfo.contains(" hypervisor");
    json!({
        "cpu": model,
        "cpus": cpus,
        "kernel": kernel,
        "mem_kib": mem_kib,
        "virtualized": hypervisor,
    })
}

/// The target directory: `CARGO_TARGET_DIR` when absolute, else the ancestor of this
/// executable that holds cargo's `CACHEDIR.TAG`, else the workspace's `target/`.
pub(crate) fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target")
}

/// Writes the JSON document to `<target dir>/<name>`.
pub(crate) fn write_json(doc: &Value, name: &str) -> io::Result<PathBuf> {
    let path = target_dir().join(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(doc).map_err(io::Error::other)?;
    std::fs::write(&path, text + "\n")?;
    Ok(path)
}
