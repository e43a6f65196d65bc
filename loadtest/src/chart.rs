//! The latency chart, written as a standalone SVG file.
//!
//! The first panel shows each latency by percentile (the x axis stretches the tail: 90 %,
//! 99 %, 99.9 % are equally far apart), which is where queueing shows. The second, drawn when
//! users started at different times (ramp, conversation turns), shows each message's latencies
//! against the time it was due, which is where a target falling behind shows. Both y axes are
//! logarithmic so that token gaps of milliseconds and replies of seconds fit one chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::report::{LatencyHistogram, Outcome, Report};

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 340.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 180.0;
const MARGIN_TOP: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 50.0;

const FIRST_TOKEN_COLOUR: &str = "#1f77b4";
const FULL_REPLY_COLOUR: &str = "#ff7f0e";
const INTER_TOKEN_COLOUR: &str = "#2ca02c";
const ERROR_COLOUR: &str = "#d62728";

/// Points the percentile curves are sampled at.
const CURVE_POINTS: usize = 240;
/// Most messages drawn in the over-time panel; beyond it every n-th is drawn.
const MAX_DOTS: usize = 4000;

/// Writes the chart of `report` to `path`.
pub fn write_svg(report: &Report, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, render(report)).with_context(|| format!("cannot write the chart to {}", path.display()))
}

/// The chart of `report` as an SVG document.
pub fn render(report: &Report) -> String {
    let over_time = report.records.iter().any(|record| !record.scheduled.is_zero());
    let panels = if over_time { 2.0 } else { 1.0 };
    let height = MARGIN_TOP + panels * PANEL_HEIGHT;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        concat!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}""##,
            r##" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"##
        ),
        width = WIDTH,
        height = height
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let title = format!(
        "chatfleet-loadtest {} · {} · {} answered, {} failed",
        report.run_id,
        report.scenario.describe(),
        report.counts.answered,
        report.counts.failed
    );
    let _ = writeln!(svg, r##"<text x="{MARGIN_LEFT}" y="28" font-size="16">{}</text>"##, escape(&title));
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN_LEFT}" y="48" fill="#555">{} {}</text>"##,
        escape(match report.target.kind {
            crate::plan::TargetKind::Gateway => "gateway",
            crate::plan::TargetKind::Openai => "openai",
        }),
        escape(&report.target.url)
    );

    percentile_panel(&mut svg, report, MARGIN_TOP);
    if over_time {
        over_time_panel(&mut svg, report, MARGIN_TOP + PANEL_HEIGHT);
    }
    svg.push_str("</svg>\n");
    svg
}

/// Maps values to pixels, linearly or on a log scale.
#[derive(Debug, Clone, Copy)]
struct Scale {
    low: f64,
    high: f64,
    from: f64,
    to: f64,
    log: bool,
}

impl Scale {
    fn pixel(&self, value: f64) -> f64 {
        let (value, low, high) = if self.log {
            (value.max(self.low).log10(), self.low.log10(), self.high.log10())
        } else {
            (value, self.low, self.high)
        };
        let span = if high > low { high - low } else { 1.0 };
        self.from + (value - low) / span * (self.to - self.from)
    }
}

/// Decades a y axis spans at most: enough for token gaps under slow replies, without letting a
/// few microsecond gaps (tokens that arrived in one read) squash everything else.
const MAX_DECADES: i32 = 4;

/// A log scale of whole decades around the given values, in milliseconds; values below it are
/// drawn on its lower edge.
fn log_ms_scale(values: impl Iterator<Item = f64>, from: f64, to: f64) -> Scale {
    let (mut low, mut high) = (f64::MAX, f64::MIN);
    for value in values.filter(|v| *v > 0.0) {
        low = low.min(value);
        high = high.max(value);
    }
    if low > high {
        (low, high) = (1.0, 1000.0);
    }
    let high_decade = high.log10().ceil();
    let low_decade = low.log10().floor().max(high_decade - f64::from(MAX_DECADES)).max(-3.0);
    let low = 10f64.powf(low_decade);
    let high = 10f64.powf(high_decade.max(low_decade + 1.0));
    Scale { low, high, from, to, log: true }
}

fn draw_y_axis(svg: &mut String, y: Scale, x_from: f64, x_to: f64) {
    let mut decade = y.low;
    while decade <= y.high * 1.0001 {
        for (step, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let value = decade * step;
            if value > y.high * 1.0001 {
                break;
            }
            let py = y.pixel(value);
            let stroke = if major { "#ccc" } else { "#eee" };
            let _ = writeln!(svg, r##"<line x1="{x_from}" x2="{x_to}" y1="{py:.1}" y2="{py:.1}" stroke="{stroke}"/>"##);
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{}">{}</text>"##,
                x_from - 6.0,
                py + 4.0,
                if major { "#333" } else { "#888" },
                format_ms(value)
            );
        }
        decade *= 10.0;
    }
}

fn format_ms(value: f64) -> String {
    if value >= 1000.0 { format!("{} s", trim(value / 1000.0)) } else { format!("{} ms", trim(value)) }
}

fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn draw_frame(svg: &mut String, top: f64, title: &str, x_label: &str) -> (f64, f64, f64, f64) {
    let (left, right) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
    let (upper, lower) = (top + 20.0, top + PANEL_HEIGHT - MARGIN_BOTTOM);
    let _ = writeln!(svg, r##"<text x="{left}" y="{:.1}" font-size="14">{}</text>"##, top + 10.0, escape(title));
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{upper:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#999"/>"##,
        right - left,
        lower - upper
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
        (left + right) / 2.0,
        lower + 36.0,
        escape(x_label)
    );
    (left, right, upper, lower)
}

fn legend(svg: &mut String, x: f64, y: f64, entries: &[(&str, &str)]) {
    for (i, (colour, label)) in entries.iter().enumerate() {
        let row = y + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r##"<rect x="{x}" y="{:.1}" width="14" height="4" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            row - 4.0,
            x + 20.0,
            row + 1.0,
            escape(label)
        );
    }
}

/// Latency by percentile, one curve per latency.
fn percentile_panel(svg: &mut String, report: &Report, top: f64) {
    let (left, right, upper, lower) = draw_frame(svg, top, "Latency by percentile", "percentile");
    let h = &report.histograms;
    let series: [(&LatencyHistogram, &str, &str); 3] = [
        (&h.first_token, FIRST_TOKEN_COLOUR, "time to first token"),
        (&h.full_reply, FULL_REPLY_COLOUR, "full reply"),
        (&h.inter_token, INTER_TOKEN_COLOUR, "inter-token gap"),
    ];
    // The tail is drawn as far as the data reaches: 99.9 % needs about a thousand values.
    let most = series.iter().map(|(histogram, ..)| histogram.len()).max().unwrap_or(0).max(10);
    let x_max = (most as f64).log10().clamp(1.0, 5.0);
    let x = Scale { low: 0.0, high: x_max, from: left, to: right, log: false };
    let quantile_at = |position: f64| 1.0 - 10f64.powf(-position);
    let curves: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(histogram, ..)| {
            if histogram.is_empty() {
                return Vec::new();
            }
            (0..CURVE_POINTS)
                .map(|i| {
                    let position = x_max * i as f64 / (CURVE_POINTS - 1) as f64;
                    (position, histogram.quantile_ms(quantile_at(position)))
                })
                .collect()
        })
        .collect();
    let y = log_ms_scale(curves.iter().flatten().map(|(_, ms)| *ms), lower, upper);
    draw_y_axis(svg, y, left, right);

    let mut ticks = vec![(0.0, "0%".to_owned()), (2f64.log10(), "50%".to_owned())];
    for decade in 1..=5 {
        let position = f64::from(decade);
        if position <= x_max + 1e-9 {
            let nines = format!("{:.*}", usize::try_from(decade - 2).unwrap_or(0), 100.0 * quantile_at(position));
            ticks.push((position, format!("{nines}%")));
        }
    }
    for (position, label) in ticks {
        let px = x.pixel(position);
        let _ = writeln!(svg, r##"<line x1="{px:.1}" x2="{px:.1}" y1="{upper:.1}" y2="{lower:.1}" stroke="#eee"/>"##);
        let _ = writeln!(svg, r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##, lower + 16.0);
    }

    for ((_, colour, _), curve) in series.iter().zip(&curves) {
        if curve.is_empty() {
            continue;
        }
        let points: Vec<String> =
            curve.iter().map(|(position, ms)| format!("{:.1},{:.1}", x.pixel(*position), y.pixel(*ms))).collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
    }
    let entries: Vec<(&str, &str)> = series.iter().map(|(_, colour, label)| (*colour, *label)).collect();
    legend(svg, right + 16.0, upper + 10.0, &entries);
}

/// Each message's latencies against the time it was due.
fn over_time_panel(svg: &mut String, report: &Report, top: f64) {
    let (left, right, upper, lower) = draw_frame(svg, top, "Latency over the run", "time the message was due (s)");
    let stride = report.records.len().div_ceil(MAX_DOTS).max(1);
    let drawn: Vec<_> = report.records.iter().step_by(stride).collect();
    let last = report.records.iter().map(|record| record.scheduled.as_secs_f64()).fold(0.0, f64::max);
    let x_high = nice_ceiling(last.max(0.001));
    let x = Scale { low: 0.0, high: x_high, from: left, to: right, log: false };
    let answered = drawn.iter().filter_map(|record| match &record.outcome {
        Outcome::Answered { first_token, total, .. } => {
            Some([first_token.map(|d| d.as_secs_f64() * 1000.0), Some(total.as_secs_f64() * 1000.0)])
        }
        _ => None,
    });
    let y = log_ms_scale(answered.clone().flatten().flatten(), lower, upper);
    draw_y_axis(svg, y, left, right);

    let step = nice_ceiling(x_high / 8.0);
    for value in (0..).map(|i| step * f64::from(i)).take_while(|value| *value <= x_high * 1.0001) {
        let px = x.pixel(value);
        let _ = writeln!(svg, r##"<line x1="{px:.1}" x2="{px:.1}" y1="{upper:.1}" y2="{lower:.1}" stroke="#eee"/>"##);
        let _ =
            writeln!(svg, r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##, lower + 16.0, trim(value));
    }

    let mut dots = String::new();
    let mut failures = 0;
    for record in &drawn {
        let px = x.pixel(record.scheduled.as_secs_f64());
        match &record.outcome {
            Outcome::Answered { first_token, total, .. } => {
                let total_y = y.pixel(total.as_secs_f64() * 1000.0);
                let _ =
                    write!(dots, r##"<circle cx="{px:.1}" cy="{total_y:.1}" r="1.6" fill="{FULL_REPLY_COLOUR}"/>"##);
                if let Some(first_token) = first_token {
                    let first_y = y.pixel(first_token.as_secs_f64() * 1000.0);
                    let _ = write!(
                        dots,
                        r##"<circle cx="{px:.1}" cy="{first_y:.1}" r="1.6" fill="{FIRST_TOKEN_COLOUR}"/>"##
                    );
                }
            }
            Outcome::Failed { .. } => {
                failures += 1;
                let _ = write!(
                    dots,
                    r##"<line x1="{px:.1}" x2="{px:.1}" y1="{upper:.1}" y2="{:.1}" stroke="{ERROR_COLOUR}"/>"##,
                    upper + 8.0
                );
            }
            Outcome::NotSent { .. } => {}
        }
        dots.push('\n');
    }
    svg.push_str(&dots);
    let mut entries = vec![(FIRST_TOKEN_COLOUR, "time to first token"), (FULL_REPLY_COLOUR, "full reply")];
    if failures > 0 {
        entries.push((ERROR_COLOUR, "failed (top edge)"));
    }
    if stride > 1 {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#888">every {stride}th message</text>"##,
            right + 16.0,
            upper + 90.0
        );
    }
    legend(svg, right + 16.0, upper + 10.0, &entries);
}

/// The smallest 1, 2 or 5 times a power of ten that is at least `value`.
fn nice_ceiling(value: f64) -> f64 {
    let decade = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|step| step * decade).find(|nice| *nice >= value * 0.9999).unwrap_or(value)
}

/// Escapes text for SVG character data and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings_round_up_to_one_two_or_five() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(30.0), 50.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }

    #[test]
    fn markup_in_labels_is_escaped() {
        assert_eq!(escape(r##"<a href="x">&'"##), "&lt;a href=&quot;x&quot;&gt;&amp;&apos;");
    }

    #[test]
    fn a_log_scale_spans_whole_decades_around_the_values() {
        let scale = log_ms_scale([3.0, 420.0].into_iter(), 100.0, 0.0);

        assert_eq!((scale.low, scale.high), (1.0, 1000.0));
        assert_eq!(scale.pixel(1.0), 100.0);
        assert_eq!(scale.pixel(1000.0), 0.0);
    }

    #[test]
    fn a_log_scale_spans_at_most_four_decades_below_the_largest_value() {
        let scale = log_ms_scale([0.004, 20.0, 4200.0].into_iter(), 100.0, 0.0);

        assert_eq!((scale.low, scale.high), (1.0, 10_000.0));
        assert_eq!(scale.pixel(0.004), 100.0, "smaller values sit on the lower edge");
    }
}
