//! Minimal SVG plots: line plots (remaining dirty memory and throttle against
//! time) and bar charts (one panel per figure, one bar per scenario).

use std::fmt::Write;

/// One series of (x, y) points with its axis label.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
    /// Line colour (any SVG colour).
    pub colour: &'static str,
}

const W: f64 = 720.0;
const H: f64 = 360.0;
const L: f64 = 70.0;
const R: f64 = 70.0;
const T: f64 = 40.0;
const B: f64 = 50.0;

fn max_of(points: &[(f64, f64)], f: impl Fn(&(f64, f64)) -> f64) -> f64 {
    points.iter().map(f).fold(0.0, f64::max)
}

/// Horizontal position of `x` on an axis that ends at `xmax`.
fn px(x: f64, xmax: f64) -> f64 {
    L + x / xmax * (W - L - R)
}

/// Vertical position of `y` on an axis that ends at `m`.
fn py(y: f64, m: f64) -> f64 {
    H - B - y / m * (H - T - B)
}

/// An SVG with `left` on the left axis and `right` on the right axis.
pub fn svg(title: &str, x_label: &str, left: &Series, right: &Series) -> String {
    let xmax = max_of(&left.points, |p| p.0)
        .max(max_of(&right.points, |p| p.0))
        .max(1e-3);
    let lmax = max_of(&left.points, |p| p.1).max(1.0) * 1.1;
    let rmax = max_of(&right.points, |p| p.1).max(1.0) * 1.1;
    let mut s = open(W, H, title);
    axes(&mut s, x_label, xmax, lmax, rmax);
    for (series, m, x) in [(left, lmax, 14.0), (right, rmax, W - 14.0)] {
        line(&mut s, series, xmax, m, x);
    }
    s.push_str("</svg>\n");
    s
}

/// An SVG's opening: its size, a white background and the title on top.
fn open(width: f64, height: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        esc(title)
    );
    s
}

/// The axes with five ticks each and the x label.
fn axes(s: &mut String, x_label: &str, xmax: f64, lmax: f64, rmax: f64) {
    let _ = writeln!(
        s,
        r#"<path d="M{L},{T} V{} H{}" fill="none" stroke="black"/><path d="M{},{T} V{}" fill="none" stroke="black"/>"#,
        H - B,
        W - R,
        W - R,
        H - B
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let y = py(f * lmax, lmax);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
            L - 6.0,
            y + 4.0,
            f * lmax
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{:.0}</text>"#,
            W - R + 6.0,
            y + 4.0,
            f * rmax
        );
        let x = px(f * xmax, xmax);
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{:.1}</text>"#,
            H - B + 16.0,
            f * xmax
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        W / 2.0,
        H - 10.0,
        esc(x_label)
    );
}

/// One series as a line scaled to `m`, and its label turned along the axis at
/// `label_x`.
fn line(s: &mut String, series: &Series, xmax: f64, m: f64, label_x: f64) {
    let path: Vec<String> = series
        .points
        .iter()
        .map(|&(a, b)| format!("{:.1},{:.1}", px(a, xmax), py(b, m)))
        .collect();
    if !path.is_empty() {
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            path.join(" "),
            series.colour
        );
    }
    let x = label_x;
    let _ = writeln!(
        s,
        r#"<text x="{x}" y="{}" fill="{}" text-anchor="middle" transform="rotate(-90 {x} {})">{}</text>"#,
        H / 2.0,
        series.colour,
        H / 2.0,
        esc(&series.label)
    );
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Bar charts side by side, one panel per `(figure, values)`, one bar per
/// label (in the same order in every panel), each bar with its value on top.
pub fn bars(title: &str, labels: &[String], panels: &[(&str, Vec<f64>)]) -> String {
    const COLOURS: [&str; 6] = ["#888", "#4a7", "#275", "#49c", "#136", "#c63"];
    let pw = 360.0;
    let (ph, top, bottom) = (300.0, 50.0, 170.0);
    let width = pw * panels.len().max(1) as f64;
    let height = top + ph + bottom;
    let mut s = open(width, height, title);
    for (p, (figure, values)) in panels.iter().enumerate() {
        let x0 = p as f64 * pw + 40.0;
        let m = values.iter().copied().fold(0.0, f64::max).max(1e-9) * 1.15;
        let slot = (pw - 60.0) / labels.len().max(1) as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="40" text-anchor="middle">{}</text><path d="M{x0},{top} V{} H{}" fill="none" stroke="black"/>"#,
            x0 + (pw - 60.0) / 2.0,
            esc(figure),
            top + ph,
            x0 + pw - 60.0
        );
        for (i, (label, v)) in labels.iter().zip(values).enumerate() {
            let h = v / m * ph;
            let x = x0 + i as f64 * slot + slot * 0.15;
            let (y, w) = (top + ph - h, slot * 0.7);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                COLOURS[i % COLOURS.len()],
                x + w / 2.0,
                y - 3.0
            );
            let (lx, ly) = (x + w / 2.0, top + ph + 8.0);
            let _ = writeln!(
                s,
                r#"<text x="{lx:.1}" y="{ly:.1}" font-size="10" text-anchor="end" transform="rotate(-60 {lx:.1} {ly:.1})">{}</text>"#,
                esc(label)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
