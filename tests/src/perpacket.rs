//! Per-packet figures through `BPF_PROG_RUN`, as `vip-bench` and `vip-katran` take them:
//!
//! - *single*: the mean of the middle half of [`SINGLE_RUNS`] one-frame runs (each
//!   syscall's own kernel timing, timer overhead included, the same for every program).
//!   Works for every path. The kernel times a run with a clock that here moves in 10 ns
//!   steps, so a median moves in steps of 10 ns too; the middle half's mean resolves
//!   between steps (runs fall on either side of one in proportion to their cost) and
//!   still leaves out the outliers an interrupt makes.
//! - *repeat*: the median of [`REPEAT_ROUNDS`] kernel averages over [`REPEAT`] runs of one
//!   frame (one average moved by 5–20 ns between calls on this VM, whose neighbours are
//!   not ours; the median of five by 1–2). The kernel does not restore the frame between
//!   runs, so this is only meaningful where the output is a fixed point (drop and pass;
//!   an established DSR flow sent from the node's own MAC), which [`fixed_point_repeat`]
//!   checks first.

use std::borrow::Cow;

use vip_agent::dataplane::RunOutcome;

pub const SINGLE_RUNS: usize = 20_000;
pub const REPEAT: u32 = 1_000_000;
/// How many kernel averages of [`REPEAT`] runs a repeat figure is the median of.
pub const REPEAT_ROUNDS: usize = 5;

/// The mean ns of the middle half (the interquartile mean) of [`SINGLE_RUNS`] runs of
/// `run` (a frame, a repeat count → its outcome), run `i` on `frame_at(i)`; every run
/// must return action `want`.
pub fn single_ns<'f>(
    run: impl Fn(&[u8], u32) -> Result<RunOutcome, String>,
    frame_at: impl Fn(usize) -> Cow<'f, [u8]>,
    want: u32,
) -> Result<f64, String> {
    let mut ns = Vec::with_capacity(SINGLE_RUNS);
    for i in 0..SINGLE_RUNS {
        let out = run(&frame_at(i), 1)?;
        if out.action != want {
            return Err(format!("action {} want {want}", out.action));
        }
        ns.push(out.duration.as_nanos() as u64);
    }
    Ok(interquartile_mean(&mut ns))
}

/// The mean of the middle half of `values` (sorted in place): the lowest and highest
/// quarters left out.
pub fn interquartile_mean(values: &mut [u64]) -> f64 {
    values.sort_unstable();
    let quarter = values.len() / 4;
    let middle = &values[quarter..values.len() - quarter];
    if middle.is_empty() {
        return f64::NAN;
    }
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

/// Whether `frame`'s output under `run` is a fixed point: run once, then on that output,
/// the same action `want` and the same output. If not, `repeat` would measure another
/// path on its later runs.
fn is_fixed_point(
    run: &impl Fn(&[u8], u32) -> Result<RunOutcome, String>,
    frame: &[u8],
    want: u32,
) -> Result<bool, String> {
    let once = run(frame, 1)?;
    let twice = run(&once.frame, 1)?;
    Ok(twice.action == want && twice.frame == once.frame)
}

/// The kernel's average ns over [`REPEAT`] runs of `frame`.
fn average(run: &impl Fn(&[u8], u32) -> Result<RunOutcome, String>, frame: &[u8]) -> Result<f64, String> {
    Ok(run(frame, REPEAT)?.duration.as_nanos() as f64)
}

/// The median of `values` (sorted in place; `NaN` when empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of [`REPEAT_ROUNDS`] kernel averages (ns) over [`REPEAT`] runs of `frame`,
/// if its output is a fixed point ([`is_fixed_point`]); `None` otherwise.
pub fn fixed_point_repeat(
    run: impl Fn(&[u8], u32) -> Result<RunOutcome, String>,
    frame: &[u8],
    want: u32,
) -> Result<Option<f64>, String> {
    if !is_fixed_point(&run, frame, want)? {
        return Ok(None);
    }
    let mut averages = (0..REPEAT_ROUNDS).map(|_| average(&run, frame)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(median(&mut averages)))
}

/// A repeat figure taken beside the floor's.
#[derive(Clone, Copy, Debug)]
pub struct Beside {
    /// The median of the row's [`REPEAT_ROUNDS`] averages, ns.
    pub ns: f64,
    /// The median of the differences between each of those averages and the floor's
    /// average taken just before it, ns. The host's speed drifts over seconds on this VM
    /// (a row measured 40 ns over a floor taken at the start, and 16 over one taken next
    /// to it): a difference of neighbours leaves the drift out.
    pub over_floor: f64,
}

/// [`fixed_point_repeat`], each of its averages taken right after one of `floor` (the
/// `XDP_PASS` program, on the same frame); `None` if the output is no fixed point.
pub fn fixed_point_repeat_beside(
    run: impl Fn(&[u8], u32) -> Result<RunOutcome, String>,
    floor: impl Fn(&[u8], u32) -> Result<RunOutcome, String>,
    frame: &[u8],
    want: u32,
) -> Result<Option<Beside>, String> {
    if !is_fixed_point(&run, frame, want)? {
        return Ok(None);
    }
    let (mut rows, mut overs) = (Vec::with_capacity(REPEAT_ROUNDS), Vec::with_capacity(REPEAT_ROUNDS));
    for _ in 0..REPEAT_ROUNDS {
        let under = average(&floor, frame)?;
        let row = average(&run, frame)?;
        rows.push(row);
        overs.push(row - under);
    }
    Ok(Some(Beside { ns: median(&mut rows), over_floor: median(&mut overs) }))
}

#[cfg(test)]
mod tests {
    use super::interquartile_mean;

    /// Runs split between two 10 ns clock steps average to where their cost lies, and
    /// the outliers of the top and bottom quarters count for nothing.
    #[test]
    fn the_interquartile_mean_resolves_between_clock_steps_and_ignores_outliers() {
        let mut runs: Vec<u64> = [vec![0; 25], vec![100; 30], vec![110; 20], vec![50_000; 25]].concat();
        assert_eq!(interquartile_mean(&mut runs), 104.0);
        assert!(interquartile_mean(&mut []).is_nan());
    }
}
