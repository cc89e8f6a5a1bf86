//! `--report`: charts of the measured phase, drawn with plotters' SVG backend. Throughput
//! (requests/s, 201/s, unexpected/s) with the sell-out moment marked, latency percentiles
//! (p50/p90/p99 per interval, log scale) and the persistence backlog over time. `.svg`
//! gets the three charts stacked in one image; `.html` gets a self-contained page with the
//! summary and outcome tables and each chart as an inline SVG.
//!
//! Invariant: the report is drawn only from bounded aggregates (the timeline's intervals
//! and the thinned backlog samples), never from per-request data, and every string that
//! comes from the run is escaped before it reaches the HTML.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cli::ReportFormat;
use crate::history::Phase;
use crate::report::Summary;
use crate::timeline::{BacklogSeries, Point, Timeline};

/// Width of every chart, px.
const WIDTH: u32 = 1000;
/// Height of one chart, px.
const CHART_HEIGHT: u32 = 320;
/// Height of the header line of the single-SVG report, px.
const HEADER_HEIGHT: u32 = 40;

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const RED_: RGBColor = RGBColor(214, 39, 40);
const GREY_: RGBColor = RGBColor(110, 110, 110);
const PURPLE_: RGBColor = RGBColor(148, 103, 189);

/// Everything a report is drawn from.
#[derive(Debug, Clone, Copy)]
pub struct ReportData<'a> {
    pub summary: &'a Summary,
    pub timeline: &'a Timeline,
    /// Length of the measured phase.
    pub elapsed: Duration,
    pub backlog: &'a BacklogSeries,
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Writes the report in the format its extension names.
pub fn write(path: &Path, data: &ReportData<'_>) -> anyhow::Result<()> {
    let text = match ReportFormat::of(path) {
        Some(ReportFormat::Svg) => render_svg(data),
        Some(ReportFormat::Html) => render_html(data),
        None => anyhow::bail!(
            "--report {} must end in .html, .htm or .svg",
            path.display()
        ),
    }
    .map_err(anyhow::Error::msg)?;
    std::fs::write(path, text)?;
    Ok(())
}

/// All three charts stacked in one SVG image, under a one-line header.
pub fn render_svg(data: &ReportData<'_>) -> Result<String, String> {
    let points = data.timeline.points(data.elapsed);
    let mut buf = String::new();
    draw_into(
        &mut buf,
        (WIDTH, HEADER_HEIGHT + 3 * CHART_HEIGHT),
        |root| {
            root.fill(&WHITE)?;
            let (header, body) = root.split_vertically(HEADER_HEIGHT);
            header.draw_text(
                &headline(data.summary),
                &("sans-serif", 16).into_font().color(&BLACK),
                (10, 12),
            )?;
            let areas = body.split_evenly((3, 1));
            draw_throughput(&areas[0], data, &points)?;
            draw_latency(&areas[1], data, &points)?;
            draw_backlog(&areas[2], data)?;
            Ok(())
        },
    )?;
    Ok(buf)
}

/// A page with the summary, the outcome classes and the three charts inline.
pub fn render_html(data: &ReportData<'_>) -> Result<String, String> {
    let points = data.timeline.points(data.elapsed);
    let size = (WIDTH, CHART_HEIGHT);
    let mut throughput = String::new();
    draw_into(&mut throughput, size, |root| {
        root.fill(&WHITE)?;
        draw_throughput(root, data, &points)
    })?;
    let mut latency = String::new();
    draw_into(&mut latency, size, |root| {
        root.fill(&WHITE)?;
        draw_latency(root, data, &points)
    })?;
    let mut backlog = String::new();
    draw_into(&mut backlog, size, |root| {
        root.fill(&WHITE)?;
        draw_backlog(root, data)
    })?;

    let s = data.summary;
    let mut h = String::new();
    // Writing into a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>claimgate-loadtest: {}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}\n\
         td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}\n\
         td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}\n\
         .unexpected {{ color: #b00; }}\n.warning {{ color: #b60; font-weight: bold; }}\n\
         .note {{ color: #555; }}\n</style>\n</head>\n<body>\n\
         <h1>claimgate-loadtest report</h1>\n<p>{}</p>\n",
        esc(&s.scenario),
        esc(&headline(s)),
    );
    for w in &s.warnings {
        let _ = writeln!(h, "<p class=\"warning\">warning: {}</p>", esc(w));
    }
    h.push_str("<h2>Summary</h2>\n<table>\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(
            h,
            "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
            esc(k),
            esc(&v)
        );
    };
    row("duration", format!("{:.3} s", s.elapsed_s));
    row("requests", s.requests.to_string());
    row("requests/s", format!("{:.1}", s.rps));
    row("claims sent", s.claims.to_string());
    row("claims ok (201)", s.claims_ok.to_string());
    row("claims ok/s (whole run)", format!("{:.1}", s.claims_per_s));
    match &s.sell_out {
        Some(so) => {
            let phase = if so.phase == Phase::Drain {
                " (drain phase)"
            } else {
                ""
            };
            row("sold out after", format!("{:.3} s{phase}", so.after_s));
            row(
                "claims ok/s while stock lasted",
                format!("{:.1} ({} claims)", so.claims_per_s, so.claims_ok),
            );
        }
        None => row("sold out after", "not sold out".into()),
    }
    row("expected outcomes", s.expected.to_string());
    row("unexpected outcomes", s.unexpected.to_string());
    let l = &s.latency_ms;
    row(
        "latency p50 / p90 / p99 / p99.9 / max (ms)",
        format!(
            "{:.3} / {:.3} / {:.3} / {:.3} / {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max
        ),
    );
    if let Some(peak) = data.backlog.peak() {
        row("peak persistence backlog", peak.to_string());
    }
    if s.target_rate.is_some() {
        row("unsent (behind)", s.unsent.to_string());
    }
    h.push_str("</table>\n<h2>Outcomes</h2>\n<table>\n<tr><th>class</th><th>outcome</th><th>count</th></tr>\n");
    for (class, map) in [
        ("expected", &s.by_class.expected),
        ("unexpected", &s.by_class.unexpected),
    ] {
        if map.is_empty() {
            let _ = writeln!(
                h,
                "<tr class=\"{class}\"><td>{class}</td><td>(none)</td><td class=\"n\">0</td></tr>"
            );
        }
        for (k, v) in map {
            let _ = writeln!(
                h,
                "<tr class=\"{class}\"><td>{class}</td><td>{}</td><td class=\"n\">{v}</td></tr>",
                esc(k)
            );
        }
    }
    h.push_str("</table>\n");
    let _ = write!(
        h,
        "<h2>Throughput</h2>\n{}\n<h2>Latency percentiles</h2>\n{}\n\
         <h2>Persistence backlog</h2>\n{}\n",
        strip_xml_prolog(&throughput),
        strip_xml_prolog(&latency),
        strip_xml_prolog(&backlog),
    );
    let _ = writeln!(
        h,
        "<p class=\"note\">Intervals of {} ms (by answer time). Latency is measured {}. \
         The backlog is the gateway's <code>persister.backlog</code> from <code>/readyz</code>, \
         sampled during the measured phase.</p>\n</body>\n</html>",
        data.timeline.interval().as_millis(),
        if s.target_rate.is_some() {
            "from each request's intended send time (open loop)"
        } else {
            "from the moment each request was handed to its connection (closed loop)"
        },
    );
    Ok(h)
}

/// Draws onto an SVG of `size` held in `buf`.
fn draw_into(
    buf: &mut String,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), String> {
    let root = SVGBackend::with_string(buf, size).into_drawing_area();
    draw(&root).map_err(|e| format!("drawing the report: {e}"))?;
    root.present()
        .map_err(|e| format!("drawing the report: {e}"))
}

/// Inline SVG in HTML needs no XML declaration.
fn strip_xml_prolog(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// `scenario flash-sale, closed loop, 64 connections, http://..., batch lt-1`.
fn headline(s: &Summary) -> String {
    let mode = match s.target_rate {
        Some(r) => format!("open loop at {r} req/s"),
        None => "closed loop".into(),
    };
    format!(
        "claimgate-loadtest: scenario {}, {mode}, {} connections, {}{}, {:.3} s",
        s.scenario,
        s.connections,
        s.url,
        s.batch_id
            .as_deref()
            .map(|b| format!(", batch {b}"))
            .unwrap_or_default(),
        s.elapsed_s,
    )
}

/// HTML text escaping.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// End of the x axis: the phase, or the last point or sample if later.
fn x_end(data: &ReportData<'_>, points: &[Point]) -> f64 {
    let mut end = data.elapsed.as_secs_f64();
    if let Some(p) = points.last() {
        end = end.max(p.t_s);
    }
    if let Some(b) = data.backlog.samples.last() {
        end = end.max(b.t_s);
    }
    if end > 0.0 { end * 1.02 } else { 1.0 }
}

/// Splits a series with gaps (`None`) into the runs of points to draw as lines.
fn segments(points: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for p in points {
        match value(p) {
            Some(v) if v.is_finite() => current.push((p.t_s, v)),
            _ => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Draws one series (possibly in several pieces) with one legend entry.
fn draw_line<'a, CT>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    pieces: Vec<Vec<(f64, f64)>>,
    color: RGBColor,
    label: &str,
) -> DrawResult
where
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    let mut first = true;
    for piece in pieces {
        let style = color.stroke_width(2);
        let series = chart.draw_series(LineSeries::new(piece, style).point_size(1))?;
        if first {
            series.label(label.to_string()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
            first = false;
        }
    }
    Ok(())
}

fn draw_throughput(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    data: &ReportData<'_>,
    points: &[Point],
) -> DrawResult {
    let x_max = x_end(data, points);
    let y_max = points
        .iter()
        .map(|p| {
            p.requests_per_s
                .max(p.claims_ok_per_s)
                .max(p.unexpected_per_s)
        })
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (per second)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the measured phase")
        .y_desc("per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    draw_line(
        &mut chart,
        segments(points, |p| Some(p.requests_per_s)),
        BLUE_,
        "requests/s",
    )?;
    draw_line(
        &mut chart,
        segments(points, |p| Some(p.claims_ok_per_s)),
        GREEN_,
        "claims ok (201)/s",
    )?;
    draw_line(
        &mut chart,
        segments(points, |p| Some(p.unexpected_per_s)),
        RED_,
        "unexpected/s",
    )?;
    if let Some(so) = data.summary.sell_out.filter(|s| s.phase == Phase::Measure) {
        let x = so.after_s;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                GREY_.stroke_width(1),
            )))?
            .label(format!("sold out at {x:.3} s"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], GREY_.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn draw_latency(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    data: &ReportData<'_>,
    points: &[Point],
) -> DrawResult {
    let x_max = x_end(data, points);
    let values: Vec<f64> = points
        .iter()
        .flat_map(|p| [p.p50_ms, p.p90_ms, p.p99_ms])
        .flatten()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0_f64, f64::max);
    let (lo, hi) = if values.is_empty() {
        (0.01, 10.0)
    } else {
        ((lo * 0.7).max(0.001), (hi * 1.5).max(lo * 10.0))
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Latency percentiles per interval (ms, log scale)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the measured phase")
        .y_desc("ms")
        .y_label_formatter(&|v| format_ms(*v))
        .draw()?;
    if values.is_empty() {
        area.draw_text(
            "no answers: nothing to plot",
            &("sans-serif", 16).into_font().color(&GREY_),
            (WIDTH as i32 / 2 - 100, CHART_HEIGHT as i32 / 2),
        )?;
        return Ok(());
    }
    draw_line(&mut chart, segments(points, |p| p.p50_ms), GREEN_, "p50")?;
    draw_line(&mut chart, segments(points, |p| p.p90_ms), ORANGE_, "p90")?;
    draw_line(&mut chart, segments(points, |p| p.p99_ms), RED_, "p99")?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn format_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn draw_backlog(area: &DrawingArea<SVGBackend<'_>, Shift>, data: &ReportData<'_>) -> DrawResult {
    let samples = &data.backlog.samples;
    let x_max = x_end(data, &[]);
    let y_max = samples
        .iter()
        .map(|s| s.backlog as f64)
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Persistence backlog (claim records not yet in the database)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the start of the measured phase")
        .y_desc("records")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    if samples.is_empty() {
        let why = data
            .backlog
            .note
            .clone()
            .unwrap_or_else(|| "no /readyz sample was taken".into());
        area.draw_text(
            &format!("not sampled: {why}"),
            &("sans-serif", 15).into_font().color(&GREY_),
            (90, CHART_HEIGHT as i32 / 2),
        )?;
        return Ok(());
    }
    let line: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, s.backlog as f64)).collect();
    draw_line(&mut chart, vec![line], PURPLE_, "backlog (from /readyz)")?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ScenarioKind;
    use crate::outcome::Expectations;
    use crate::report::{Endpoint, RunInfo, SellOut, Stats};
    use crate::timeline::{BacklogSample, Recorder};

    fn summary(sell_out: Option<SellOut>, warnings: Vec<String>) -> Summary {
        let mut st = Stats::new();
        st.record_reply(Endpoint::Claim, 201, None, Duration::from_millis(2));
        st.record_reply(
            Endpoint::Claim,
            410,
            Some("sold_out".into()),
            Duration::from_millis(1),
        );
        st.record_reply(
            Endpoint::Claim,
            500,
            Some("<script>".into()),
            Duration::from_millis(1),
        );
        Summary::new(
            RunInfo {
                scenario: "flash-sale".into(),
                target_rate: None,
                connections: 4,
                url: "http://127.0.0.1:8080".into(),
                batch_id: Some("lt-1".into()),
                seed: 1,
                elapsed: Duration::from_secs(3),
                unsent: 0,
                interrupted: false,
                expect: Expectations {
                    scenario: ScenarioKind::FlashSale,
                    phase: Phase::Measure,
                    shedding: false,
                    foreign_batch: false,
                },
                sell_out,
                warnings,
            },
            &st,
        )
    }

    fn timeline() -> Timeline {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(Timeline::default()));
        let t0 = tokio::time::Instant::now();
        let mut r = Recorder::new(std::sync::Arc::clone(&shared), t0);
        for i in 0..3000u64 {
            let done = t0 + Duration::from_millis(i);
            let ok = i < 1000;
            r.record(
                done,
                Some(Duration::from_micros(500 + i % 700)),
                ok,
                crate::outcome::Class::Expected,
            );
        }
        r.finish();
        crate::timeline::snapshot(&shared)
    }

    fn backlog() -> BacklogSeries {
        BacklogSeries {
            samples: (0..6)
                .map(|i| BacklogSample {
                    t_s: f64::from(i) * 0.5,
                    backlog: u64::try_from(i * 100).unwrap_or(0),
                    lag_ms: None,
                })
                .collect(),
            note: None,
            failed: 0,
        }
    }

    #[test]
    fn svg_report_holds_the_three_charts() {
        let s = summary(
            Some(SellOut::new(Phase::Measure, Duration::from_secs(1), 1000)),
            vec![],
        );
        let t = timeline();
        let b = backlog();
        let svg = render_svg(&ReportData {
            summary: &s,
            timeline: &t,
            elapsed: Duration::from_secs(3),
            backlog: &b,
        })
        .expect("svg");
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{}",
            &svg[..80]
        );
        for title in [
            "Throughput (per second)",
            "Latency percentiles per interval",
            "Persistence backlog",
            "requests/s",
            "p99",
            "sold out at 1.000 s",
            "backlog (from /readyz)",
        ] {
            assert!(svg.contains(title), "missing {title}");
        }
        // Lines were drawn: at least requests, 201, unexpected, p50/p90/p99, backlog.
        assert!(svg.matches("<polyline").count() >= 7, "{svg}");
    }

    #[test]
    fn html_report_embeds_svgs_and_escapes() {
        let s = summary(None, vec!["batch <lt-1> & co".into()]);
        let t = timeline();
        let b = BacklogSeries {
            note: Some("the gateway runs no persister".into()),
            ..BacklogSeries::default()
        };
        let html = render_html(&ReportData {
            summary: &s,
            timeline: &t,
            elapsed: Duration::from_secs(3),
            backlog: &b,
        })
        .expect("html");
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 3, "three inline charts");
        assert!(!html.contains("<?xml"));
        assert!(
            html.contains("warning: batch &lt;lt-1&gt; &amp; co"),
            "{html}"
        );
        assert!(html.contains("500 &lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"));
        assert!(html.contains("not sampled: the gateway runs no persister"));
        assert!(html.contains("<td>unexpected</td>"));
        assert!(html.contains("not sold out"));
    }

    #[test]
    fn empty_runs_still_render() {
        let s = summary(None, vec![]);
        let t = Timeline::default();
        let b = BacklogSeries::default();
        let data = ReportData {
            summary: &s,
            timeline: &t,
            elapsed: Duration::ZERO,
            backlog: &b,
        };
        let svg = render_svg(&data).expect("svg");
        assert!(svg.contains("no answers: nothing to plot"));
        assert!(render_html(&data).expect("html").contains("</html>"));
    }

    #[test]
    fn gaps_split_lines() {
        let p = |t: f64, v: Option<f64>| Point {
            t_s: t,
            requests_per_s: 0.0,
            claims_ok_per_s: 0.0,
            unexpected_per_s: 0.0,
            p50_ms: v,
            p90_ms: v,
            p99_ms: v,
        };
        let pts = [
            p(0.0, Some(1.0)),
            p(1.0, Some(2.0)),
            p(2.0, None),
            p(3.0, Some(f64::NAN)),
            p(4.0, Some(3.0)),
        ];
        let s = segments(&pts, |x| x.p50_ms);
        assert_eq!(s, vec![vec![(0.0, 1.0), (1.0, 2.0)], vec![(4.0, 3.0)]]);
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
    }
}
