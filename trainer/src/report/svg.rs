//! The loss curve: bits/dim against step as a self-contained SVG (axes, ticks, raw and
//! smoothed training loss, validation points).

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use super::{io_err, write_atomic, MetricRecord, ReportError};

const SVG_W: f64 = 800.0;
const SVG_H: f64 = 480.0;
const PLOT_LEFT: f64 = 74.0;
const PLOT_RIGHT: f64 = 24.0;
const PLOT_TOP: f64 = 62.0;
const PLOT_BOTTOM: f64 = 56.0;

const COLOUR_TRAIN_RAW: &str = "#a6c8e6";
const COLOUR_TRAIN_EMA: &str = "#1f5fa8";
const COLOUR_VAL: &str = "#d9480f";
/// The trained weights' validation, when the run scores their average (`--ema`).
const COLOUR_VAL_TRAINED: &str = "#f2a57a";
const COLOUR_AXIS: &str = "#333333";
const COLOUR_GRID: &str = "#e6e6e6";
const COLOUR_TEXT: &str = "#222222";

/// Escapes text for use in XML character data and attribute values.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// About `target` "nice" tick values (1, 2 or 5 times a power of ten apart)
/// within `[lo, hi]`, and their spacing, which is at least `min_step`.
fn nice_ticks(lo: f64, hi: f64, target: usize, min_step: f64) -> (Vec<f64>, f64) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return (vec![lo], 1.0);
    }
    let rough = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(rough.log10().floor());
    let norm = rough / mag;
    // Thresholds at the geometric midpoints between 1, 2, 5 and 10.
    let step = mag
        * if norm < std::f64::consts::SQRT_2 {
            1.0
        } else if norm < 10f64.sqrt() {
            2.0
        } else if norm < 50f64.sqrt() {
            5.0
        } else {
            10.0
        };
    let step = step.max(min_step);
    let first = (lo / step - 1e-9).ceil();
    let mut ticks = Vec::new();
    for i in 0..100 {
        let v = (first + i as f64) * step;
        if v > hi + step * 1e-9 {
            break;
        }
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
    }
    (ticks, step)
}

/// Decimal places that distinguish ticks `step` apart.
fn decimals_for(step: f64) -> usize {
    (-(step.log10() + 1e-9).floor()).clamp(0.0, 8.0) as usize
}

/// Tick label for the step axis: `500`, `2k`, `12.5k`, `1.5M`. The suffix
/// is chosen from the axis' largest value `max` so all labels agree.
fn format_step_tick(v: f64, step: f64, max: f64) -> String {
    let (div, suffix) = if max >= 1e7 {
        (1e6, "M")
    } else if max >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    if v == 0.0 {
        return "0".to_string();
    }
    format!("{:.*}{suffix}", decimals_for(step / div), v / div)
}

/// Smallest number of training points that get a smoothed curve.
const EMA_MIN_POINTS: usize = 10;

/// Zero-phase exponential moving average of a series' values: an EMA run
/// forward, then backward over the result, so the smoothed curve does not lag
/// behind the fast initial drop of the loss. Each pass starts at its first
/// value. The span adapts to the series length (about 1/60 of the points, at
/// least 3), so the curve looks similar for short and long runs.
fn ema(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let span = (points.len() as f64 / 60.0).max(3.0);
    let alpha = 2.0 / (span + 1.0);
    let pass = |ys: &mut dyn Iterator<Item = &mut f64>| {
        let mut acc: Option<f64> = None;
        for y in ys {
            let v = acc.map_or(*y, |a| a + alpha * (*y - a));
            acc = Some(v);
            *y = v;
        }
    };
    let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    pass(&mut ys.iter_mut());
    pass(&mut ys.iter_mut().rev());
    points.iter().zip(ys).map(|(p, y)| (p.0, y)).collect()
}

/// Keeps, per pixel column, the first, lowest, highest and last points (in
/// their original order), so a long series stays small without losing spikes.
fn decimate(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let col = points[i].0.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < points.len() && points[j].0.floor() == col {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        let mut prev = None;
        for k in keep {
            if prev != Some(k) {
                out.push(points[k]);
                prev = Some(k);
            }
        }
        i = j;
    }
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let idx = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The y range to show: from the minimum to the 98th percentile of the
/// points, leaving out the first 2% of the training points (the huge
/// values at initialisation), plus a 6% margin. Points above the range are
/// clipped at the top of the plot.
fn y_range(train: &[(f64, f64)], val: &[(f64, f64)]) -> (f64, f64) {
    let skip = if train.len() >= 10 {
        (train.len() as f64 * 0.02).ceil() as usize
    } else {
        0
    };
    let mut ys: Vec<f64> = train[skip..].iter().chain(val).map(|p| p.1).collect();
    ys.sort_by(f64::total_cmp);
    let lo = ys[0];
    let mut hi = percentile(&ys, 0.98);
    // Always show the latest values, even if the run blew up at the end.
    for s in [train, val] {
        if let Some(&(_, y)) = s.last() {
            hi = hi.max(y);
        }
    }
    let (mut lo, mut hi) = (lo, hi);
    if hi - lo < 1e-9 * lo.abs().max(1.0) {
        let d = (lo.abs() * 0.05).max(0.01);
        lo -= d;
        hi += d;
    }
    let m = (hi - lo) * 0.06;
    (lo - m, hi + m)
}

fn x_range(train: &[(f64, f64)], val: &[(f64, f64)]) -> (f64, f64) {
    let xs = train.iter().chain(val).map(|p| p.0);
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(f64::NEG_INFINITY, f64::max);
    if hi > lo {
        (lo, hi)
    } else {
        let d = (lo.abs() * 0.05).max(1.0);
        ((lo - d).max(0.0), hi + d)
    }
}

fn polyline(out: &mut String, points: &[(f64, f64)], colour: &str, width: f64) {
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" stroke-linejoin="round" stroke-linecap="round" points=""#
    );
    for (i, (x, y)) in points.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{x:.1},{y:.1}");
    }
    out.push_str("\"/>\n");
}

/// Renders the loss curve of a run as a self-contained 800x480 SVG.
///
/// x is the step, y bits/dim. Draws the training series as a thin light line
/// plus its exponential moving average as a thicker darker one, and the
/// validation series as a line with markers; nice axis ticks (1/2/5 x 10^k),
/// axis titles, a legend, `title` (XML-escaped) and, in the top-right corner,
/// the final (and best) validation bits/dim. The y range is robust to the
/// huge losses at initialisation: it spans the minimum to the 98th percentile
/// of the values (leaving out the first 2% of the training points), extended
/// to include the latest values, so early points may run off the top. The
/// smoothed curve is computed from values capped just above that range, so a
/// single spike shows in the raw line without bending the trend.
///
/// Non-finite values are skipped, records are ordered by step, and with no
/// finite point at all the SVG is a frame saying "no data yet". Event records
/// (`event: Some(..)`) appear as small ticks under the x axis whose tooltip is
/// the event text.
pub fn loss_curve_svg(records: &[MetricRecord], title: &str) -> String {
    let mut sorted: Vec<&MetricRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.step);
    let series = |f: fn(&MetricRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        sorted
            .iter()
            .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
            .collect()
    };
    let train = series(|r| r.train_bpd);
    let val = series(|r| r.val_bpd);
    let val_trained = series(|r| r.val_trained_bpd);
    let val_all: Vec<(f64, f64)> = val.iter().chain(&val_trained).copied().collect();

    let pw = SVG_W - PLOT_LEFT - PLOT_RIGHT;
    let ph = SVG_H - PLOT_TOP - PLOT_BOTTOM;
    let (left, top, bottom) = (PLOT_LEFT, PLOT_TOP, PLOT_TOP + ph);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(title));
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" text-anchor="middle" font-size="17" font-weight="bold" fill="{COLOUR_TEXT}">{}</text>"#,
        SVG_W / 2.0,
        xml_escape(title)
    );

    if train.is_empty() && val.is_empty() {
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{COLOUR_AXIS}"/>"#
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="16" fill="#888888">no data yet</text>"##,
            left + pw / 2.0,
            top + ph / 2.0
        );
        s.push_str("</svg>\n");
        return s;
    }

    let (x0, x1) = x_range(&train, &val_all);
    let (y0, y1) = y_range(&train, &val_all);
    // Clamp far-off-plot coordinates so renderers never see astronomically
    // large numbers; the clip path hides them anyway.
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| (bottom - (y - y0) / (y1 - y0) * ph).clamp(-10.0 * SVG_H, 11.0 * SVG_H);
    let to_px = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        pts.iter().map(|&(x, y)| (px(x), py(y))).collect()
    };

    let _ = writeln!(
        s,
        r#"<defs><clipPath id="clayflow-plot-area"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath></defs>"#
    );

    // Grid lines and tick labels.
    let (xticks, xstep) = nice_ticks(x0, x1, 6, 1.0);
    let (yticks, ystep) = nice_ticks(y0, y1, 5, 0.0);
    let ydec = decimals_for(ystep);
    s.push_str("<g>\n");
    for &t in &xticks {
        let x = px(t);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{COLOUR_GRID}"/><line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="{COLOUR_AXIS}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="{COLOUR_TEXT}">{}</text>"#,
            bottom + 5.0,
            bottom + 19.0,
            format_step_tick(t, xstep, x1.abs().max(x0.abs()))
        );
    }
    for &t in &yticks {
        let y = py(t);
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{COLOUR_GRID}"/><line x1="{:.1}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="{COLOUR_AXIS}"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{COLOUR_TEXT}">{t:.ydec$}</text>"#,
            left + pw,
            left - 5.0,
            left - 8.0,
            y + 4.0,
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{COLOUR_AXIS}"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="{COLOUR_TEXT}">step</text>"#,
        left + pw / 2.0,
        SVG_H - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" font-size="13" fill="{COLOUR_TEXT}">bits/dim</text>"#,
        top + ph / 2.0
    );

    // Series lines, clipped to the plot area. Markers are drawn afterwards,
    // unclipped (so a point on the plot's edge shows whole) but only when
    // their centre lies inside the plot.
    let many = |n: usize| n as f64 > 2.0 * pw;
    let _ = writeln!(s, r#"<g clip-path="url(#clayflow-plot-area)">"#);
    let mut legend: Vec<(&str, &str, f64, bool)> = Vec::new();
    let mut markers = String::new();
    let inside = |&(x, y): &(f64, f64)| {
        (left - 0.5..=left + pw + 0.5).contains(&x) && (top - 0.5..=bottom + 0.5).contains(&y)
    };
    if !train.is_empty() {
        let raw = to_px(&train);
        let raw = if many(raw.len()) { decimate(&raw) } else { raw };
        if train.len() >= EMA_MIN_POINTS {
            polyline(&mut s, &raw, COLOUR_TRAIN_RAW, 1.0);
            legend.push(("train", COLOUR_TRAIN_RAW, 1.5, false));
            // Smooth values capped a little above the visible range, so one
            // huge spike (shown by the raw line) does not bend the trend.
            let cap = y1 + 0.25 * (y1 - y0);
            let capped: Vec<(f64, f64)> = train.iter().map(|&(x, y)| (x, y.min(cap))).collect();
            let smooth = to_px(&ema(&capped));
            let smooth = if many(smooth.len()) {
                decimate(&smooth)
            } else {
                smooth
            };
            polyline(&mut s, &smooth, COLOUR_TRAIN_EMA, 2.2);
            legend.push(("train (smoothed)", COLOUR_TRAIN_EMA, 2.5, false));
        } else {
            // Too few points to smooth: draw them plainly, with markers.
            polyline(&mut s, &raw, COLOUR_TRAIN_EMA, 1.8);
            for (x, y) in raw.iter().filter(|p| inside(p)) {
                let _ = writeln!(
                    markers,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{COLOUR_TRAIN_EMA}"/>"#
                );
            }
            legend.push(("train", COLOUR_TRAIN_EMA, 1.8, true));
        }
    }
    if !val_trained.is_empty() {
        let pts = to_px(&val_trained);
        let pts = if many(pts.len()) { decimate(&pts) } else { pts };
        polyline(&mut s, &pts, COLOUR_VAL_TRAINED, 1.4);
        legend.push(("val., trained", COLOUR_VAL_TRAINED, 1.4, false));
    }
    if !val.is_empty() {
        let pts = to_px(&val);
        let pts = if many(pts.len()) { decimate(&pts) } else { pts };
        polyline(&mut s, &pts, COLOUR_VAL, 1.8);
        if pts.len() <= 150 {
            for (x, y) in pts.iter().filter(|p| inside(p)) {
                let _ = writeln!(
                    markers,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.2" fill="white" stroke="{COLOUR_VAL}" stroke-width="1.8"/>"#
                );
            }
        }
        let label = if val_trained.is_empty() {
            "validation"
        } else {
            "val., average"
        };
        legend.push((label, COLOUR_VAL, 1.8, true));
    }
    s.push_str("</g>\n");
    s.push_str(&markers);

    // Event marks under the x axis.
    for r in &sorted {
        if let Some(ev) = &r.event {
            let x = r.step as f64;
            if x < x0 || x > x1 {
                continue;
            }
            let x = px(x);
            let _ = writeln!(
                s,
                r##"<path d="M{x:.1} {:.1} l-4 7 h8 z" fill="#7a7a7a"><title>step {}: {}</title></path>"##,
                bottom + 1.0,
                r.step,
                xml_escape(ev)
            );
        }
    }

    // Legend, top right inside the plot (loss curves fall to the right).
    let lw = 128.0;
    let lh = 10.0 + 18.0 * legend.len() as f64;
    let lx = left + pw - lw - 10.0;
    let ly = top + 10.0;
    let _ = writeln!(
        s,
        r##"<rect x="{lx:.1}" y="{ly:.1}" width="{lw}" height="{lh}" fill="white" fill-opacity="0.9" stroke="#bbbbbb" rx="3"/>"##
    );
    for (i, (label, colour, width, marker)) in legend.iter().enumerate() {
        let y = ly + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="{width}"/>"#,
            lx + 10.0,
            lx + 38.0
        );
        if *marker {
            let fill = if *colour == COLOUR_VAL {
                "white"
            } else {
                colour
            };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="3.2" fill="{fill}" stroke="{colour}" stroke-width="1.8"/>"#,
                lx + 24.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{COLOUR_TEXT}">{label}</text>"#,
            lx + 46.0,
            y + 4.0
        );
    }

    // Final numbers, top right above the plot.
    let summary = if let Some(&(step, last)) = val.last() {
        let best = val.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let mut t = format!("final val: {last:.4} bits/dim (step {})", step as u64);
        if best < last {
            let _ = write!(t, " \u{b7} best {best:.4}");
        }
        t
    } else {
        let &(step, last) = train.last().expect("train or val is non-empty");
        format!(
            "no validation yet \u{b7} train: {last:.4} bits/dim (step {})",
            step as u64
        )
    };
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="13" fill="{COLOUR_TEXT}">{}</text>"#,
        left + pw,
        top - 10.0,
        xml_escape(&summary)
    );
    s.push_str("</svg>\n");
    s
}

/// Writes [`loss_curve_svg`] to `path`, atomically (temporary file + rename).
pub fn write_loss_svg(
    path: impl AsRef<Path>,
    records: &[MetricRecord],
    title: &str,
) -> Result<(), ReportError> {
    let path = path.as_ref();
    let svg = loss_curve_svg(records, title);
    write_atomic(path, |w| w.write_all(svg.as_bytes()).map_err(io_err(path)))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::sample_records;
    use super::super::write_png_grid;
    use super::*;
    use std::fs;

    /// Checks the shape of an SVG: well-formed ends, escaped title, no NaN,
    /// balanced-looking tags.
    fn check_svg(svg: &str, title_escaped: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(title_escaped), "title missing: {svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
        // Every open tag is self-closed or closed.
        for tag in ["text", "g", "title", "defs", "clipPath", "path"] {
            let open =
                svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count();
            let selfclosed = svg
                .split(&format!("<{tag} "))
                .skip(1)
                .filter(|rest| {
                    let end = rest.find('>').unwrap();
                    rest[..end].ends_with('/')
                })
                .count();
            let close = svg.matches(&format!("</{tag}>")).count();
            assert_eq!(open - selfclosed, close, "<{tag}> unbalanced in {svg}");
        }
        // Attribute values never contain raw quotes / ampersands.
        for (i, _) in svg.match_indices('&') {
            let rest = &svg[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| rest.starts_with(e)),
                "bare & at {i}"
            );
        }
    }

    fn synthetic(n: u64) -> Vec<MetricRecord> {
        let mut seed = 12345u64;
        let mut noise = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let mut out = Vec::new();
        for i in 0..n {
            let step = i * 10;
            let t = step as f64;
            let bpd = 1.05 + 7.0 * (-t / 150.0).exp() + 0.6 * (-t / 3000.0).exp() + 0.04 * noise();
            let mut r = MetricRecord {
                train_bpd: Some(bpd),
                lr: Some(1e-3),
                ..MetricRecord::new(step, step / 2000, t * 0.05)
            };
            if i % 100 == 99 {
                r.val_bpd = Some(1.08 + 0.62 * (-t / 3000.0).exp());
            }
            if i == 600 {
                r.event = Some("resumed from step 6000".into());
            }
            out.push(r);
        }
        out
    }

    #[test]
    fn svg_draws_the_trained_weights_beside_their_average() {
        let mut recs = synthetic(1000);
        for r in recs.iter_mut().filter(|r| r.val_bpd.is_some()) {
            r.val_trained_bpd = r.val_bpd.map(|v| v + 0.05);
        }
        let svg = loss_curve_svg(&recs, "t");
        // Raw train, smoothed train, the trained weights' validation, the average's.
        assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
        for needle in ["val., trained", "val., average", COLOUR_VAL_TRAINED] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        let plain = loss_curve_svg(&synthetic(1000), "t");
        assert!(!plain.contains(COLOUR_VAL_TRAINED) && plain.contains(">validation<"));
    }

    #[test]
    fn svg_normal_data() {
        let recs = synthetic(1000);
        let title = "MNIST <realnvp> & \"friends\"";
        let svg = loss_curve_svg(&recs, title);
        check_svg(&svg, "MNIST &lt;realnvp&gt; &amp; &quot;friends&quot;");
        // Raw train, EMA, validation.
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        for needle in [
            "step",
            "bits/dim",
            "train (smoothed)",
            "validation",
            "final val",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // The final validation value is reported.
        let last_val = recs.iter().rev().find_map(|r| r.val_bpd).unwrap();
        assert!(svg.contains(&format!("{last_val:.4}")));
    }

    #[test]
    fn svg_empty_and_single_point() {
        let svg = loss_curve_svg(&[], "empty run");
        check_svg(&svg, "empty run");
        assert!(svg.contains("no data yet"));

        // Records with no loss values (only events) are also "no data".
        let svg = loss_curve_svg(&sample_records()[..1], "events only");
        check_svg(&svg, "events only");
        assert!(svg.contains("no data yet"));

        let one = [MetricRecord {
            train_bpd: Some(3.5),
            ..MetricRecord::new(0, 0, 0.0)
        }];
        let svg = loss_curve_svg(&one, "one");
        check_svg(&svg, "one");
        assert!(svg.contains("<polyline") && svg.contains("<circle"));
        assert!(!svg.contains("no data yet"));

        let one_val = [MetricRecord {
            val_bpd: Some(2.0),
            ..MetricRecord::new(50, 0, 1.0)
        }];
        let svg = loss_curve_svg(&one_val, "one val");
        check_svg(&svg, "one val");
        assert!(svg.contains("<polyline") && svg.contains("2.0000"));
    }

    #[test]
    fn svg_skips_non_finite_values() {
        let mut recs = synthetic(50);
        recs[10].train_bpd = Some(f64::NAN);
        recs[20].train_bpd = Some(f64::INFINITY);
        recs[30].train_bpd = Some(f64::NEG_INFINITY);
        recs[49].val_bpd = Some(f64::NAN);
        recs[40].val_bpd = Some(1.5);
        let svg = loss_curve_svg(&recs, "nan run");
        check_svg(&svg, "nan run");
        assert_eq!(svg.matches("<polyline").count(), 3);
        // The NaN final validation is skipped: the reported value is 1.5.
        assert!(svg.contains("final val: 1.5000"), "{svg}");

        // All values non-finite: no data.
        let bad: Vec<_> = (0..5)
            .map(|i| MetricRecord {
                train_bpd: Some(f64::NAN),
                val_bpd: Some(f64::INFINITY),
                ..MetricRecord::new(i, 0, 0.0)
            })
            .collect();
        let svg = loss_curve_svg(&bad, "all bad");
        check_svg(&svg, "all bad");
        assert!(svg.contains("no data yet"));
    }

    #[test]
    fn svg_long_run_is_decimated_and_extreme_values_are_clamped() {
        let mut recs = synthetic(50_000);
        recs[30_000].train_bpd = Some(1e300);
        let svg = loss_curve_svg(&recs, "long");
        check_svg(&svg, "long");
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
        assert!(!svg.contains("e+") && !svg.contains("e3"));
    }

    #[test]
    fn nice_ticks_are_nice() {
        let (t, step) = nice_ticks(0.0, 10_000.0, 6, 1.0);
        assert_eq!(step, 2000.0);
        assert_eq!(t, vec![0.0, 2000.0, 4000.0, 6000.0, 8000.0, 10_000.0]);
        let (t, step) = nice_ticks(1.213, 1.287, 5, 0.0);
        assert!((step - 0.02).abs() < 1e-12, "{step}");
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|v| (1.213..=1.287).contains(v)));
        assert_eq!(decimals_for(step), 2);
        assert_eq!(format_step_tick(12_500.0, 500.0, 14_000.0), "12.5k");
        assert_eq!(format_step_tick(4_000.0, 2_000.0, 14_000.0), "4k");
        assert_eq!(format_step_tick(4_000.0, 1_000.0, 5_000.0), "4000");
        assert_eq!(format_step_tick(2_000_000.0, 1_000_000.0, 1e7), "2M");
        assert_eq!(format_step_tick(2_500_000.0, 500_000.0, 1e7), "2.5M");
        assert_eq!(format_step_tick(150.0, 50.0, 300.0), "150");
        for (lo, hi) in [(-3.0, 7.0), (0.001, 0.0013), (5.0, 5e6)] {
            let (t, _) = nice_ticks(lo, hi, 5, 0.0);
            assert!((3..=11).contains(&t.len()), "{lo}..{hi}: {t:?}");
        }
        // Steps are whole numbers.
        assert_eq!(nice_ticks(0.0, 1.0, 6, 1.0), (vec![0.0, 1.0], 1.0));
    }

    #[test]
    fn ema_smooths_without_lag() {
        let flat: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, 2.5)).collect();
        assert!(ema(&flat).iter().all(|p| (p.1 - 2.5).abs() < 1e-12));
        // A straight line stays (nearly) on itself away from the ends.
        let line: Vec<(f64, f64)> = (0..600).map(|i| (i as f64, 0.01 * i as f64)).collect();
        let sm = ema(&line);
        for i in 100..500 {
            assert!((sm[i].1 - line[i].1).abs() < 1e-6, "{i}: {:?}", sm[i]);
            assert_eq!(sm[i].0, line[i].0);
        }
        // Alternating noise is damped.
        let zig: Vec<(f64, f64)> = (0..600).map(|i| (i as f64, (i % 2) as f64)).collect();
        let sm = ema(&zig);
        assert!(sm[100..500].iter().all(|p| (p.1 - 0.5).abs() < 0.2));
    }

    #[test]
    fn write_loss_svg_writes_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        write_loss_svg(&path, &synthetic(100), "t").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, loss_curve_svg(&synthetic(100), "t"));
    }

    /// Writes a sample plot to /tmp/loss.svg for eyeballing:
    /// `cargo test -p clayflow-trainer --lib report::svg::tests::render_sample_svg -- --ignored`
    #[test]
    #[ignore]
    fn render_sample_svg() {
        write_loss_svg(
            "/tmp/loss.svg",
            &synthetic(2000),
            "RealNVP on MNIST (run a1)",
        )
        .unwrap();
        write_loss_svg("/tmp/loss_short.svg", &synthetic(30), "short run").unwrap();
        write_loss_svg("/tmp/loss_one.svg", &synthetic(1), "one point").unwrap();
        let mut long = synthetic(50_000);
        long[30_000].train_bpd = Some(f64::NAN);
        long[30_001].train_bpd = Some(40.0);
        write_loss_svg("/tmp/loss_long.svg", &long, "long run with a spike").unwrap();
        write_loss_svg("/tmp/loss_empty.svg", &[], "empty").unwrap();
        // Rings of growing radius on black, like digits: grey, then RGB.
        let ring = |k: usize, y: usize, x: usize| {
            let d = ((y as f64 - 13.5).powi(2) + (x as f64 - 13.5).powi(2)).sqrt();
            if (d - (3.0 + k as f64 * 0.6)).abs() < 1.5 {
                255
            } else {
                0
            }
        };
        let grey: Vec<u8> = (0..10 * 28 * 28)
            .map(|i| ring(i / 784, (i % 784) / 28, i % 28))
            .collect();
        write_png_grid("/tmp/grid.png", &grey, 10, 1, 28, 28, 4, 2, 3).unwrap();
        let rgb: Vec<u8> = (0..6 * 3 * 28 * 28)
            .map(|i| {
                let (k, c, p) = (i / (3 * 784), (i / 784) % 3, i % 784);
                if c == k % 3 {
                    ring(k, p / 28, p % 28)
                } else {
                    0
                }
            })
            .collect();
        write_png_grid("/tmp/grid_rgb.png", &rgb, 6, 3, 28, 28, 3, 2, 3).unwrap();
    }
}
