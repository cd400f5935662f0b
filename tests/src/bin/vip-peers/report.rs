//! Where and on what the figures were measured, and the files they go to: CSV under
//! `target/bench/`, and the measured tables in `docs/bench/README.md` between markers
//! (the prose around them is kept).

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Date, machine and commit, as every table and plot states them.
#[derive(Clone, Debug)]
pub struct Context {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub commit: String,
    /// The 1-minute load average when the measurement started.
    pub load: String,
}

impl Context {
    pub fn now() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
            .unwrap_or_else(|| "unknown CPU".into());
        Self {
            date: utc_now(),
            cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            commit: commit(),
            load: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }

    /// One line for plots and tables.
    pub fn line(&self) -> String {
        format!(
            "{} · {} cores ({}) · Linux {} · commit {} · load avg {}",
            self.date, self.cores, self.cpu, self.kernel, self.commit, self.load
        )
    }
}

/// `git describe`-like: the short commit, `+dirty` when the work tree has changes other
/// than this benchmark's own outputs (`docs/bench/`, which a run of both sections has
/// already rewritten by the time the second one starts).
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/bench"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

/// The current UTC date and time, `YYYY-MM-DD HH:MM UTC` (civil-from-days, H. Hinnant).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Writes `target/bench/NAME` (creating the directory).
pub fn write_target_bench(name: &str, text: &str) -> Result<PathBuf, String> {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// `docs/bench/`, created if needed.
pub fn docs_dir() -> Result<PathBuf, String> {
    let dir = root().join("docs/bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Replaces what lies between `<!-- SECTION:begin -->` and `<!-- SECTION:end -->` in
/// `docs/bench/README.md` with `body` (appending the markers if the file lacks them).
pub fn update_readme(section: &str, body: &str) -> Result<PathBuf, String> {
    let path = docs_dir()?.join("README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let (begin, end) = (format!("<!-- {section}:begin -->"), format!("<!-- {section}:end -->"));
    let block = format!("{begin}\n{body}\n{end}");
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{text}\n{block}\n"),
    };
    std::fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}
