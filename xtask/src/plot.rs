//! `cargo xtask plot --input SWEEP.jsonl[,MORE.jsonl…] --out FIG.png [--title TEXT]`: the
//! latency–throughput figure of the original README, from a sweep. Each input line is one run:
//! `{"system": "flexgen", "label": "32×2", "latency_s": 40.1, "throughput": 56.7}` (latency: the
//! time of one block, prompt to last token; throughput: generated tokens per second); a line
//! with an `error` (a run that failed or was killed) is left out with a note. One series per
//! `series` (default: the system), points joined in order of latency and labelled; each system
//! keeps its colour from figure to figure.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One point of a sweep.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub(crate) system: String,
    /// The line the point belongs to (e.g. `flexgen, 4-bit`); the system when not given.
    pub(crate) series: String,
    pub(crate) label: String,
    pub(crate) latency_s: f64,
    pub(crate) throughput: f64,
}

/// Reads the sweep's JSON lines.
pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<Point>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        if let Some(e) = v["error"].as_str() {
            eprintln!("{}:{}: left out ({e})", path.display(), i + 1);
            continue;
        }
        let num = |k: &str| {
            v[k].as_f64().with_context(|| format!("{}:{}: no numeric `{k}`", path.display(), i + 1))
        };
        let system = v["system"].as_str().unwrap_or("?").to_string();
        out.push(Point {
            series: v["series"].as_str().map_or_else(|| system.clone(), str::to_string),
            system,
            label: v["label"].as_str().unwrap_or("").to_string(),
            latency_s: num("latency_s")?,
            throughput: num("throughput")?,
        });
    }
    if out.is_empty() {
        bail!("{}: no points", path.display());
    }
    Ok(out)
}

/// Draws `points` into a PNG at `out`.
pub(crate) fn draw(points: &[Point], title: &str, out: &Path) -> anyhow::Result<()> {
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/DejaVuSans.ttf"),
    )
    .map_err(|_| anyhow::anyhow!("the bundled font does not load"))?;
    let mut series: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in points {
        series.entry(p.series.as_str()).or_default().push(p);
    }
    let (lmin, lmax) =
        points.iter().fold((f64::MAX, 0f64), |(a, b), p| (a.min(p.latency_s), b.max(p.latency_s)));
    // Throughput on a log scale too: the systems compared differ by two orders of magnitude.
    let (tmin, tmax) = points
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), p| (a.min(p.throughput), b.max(p.throughput)));
    let root = BitMapBackend::new(out, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (lmin * 0.8..lmax * 1.25)
                .log_scale()
                .with_key_points(log_ticks(lmin * 0.8, lmax * 1.25)),
            (tmin * 0.7..tmax * 1.4).log_scale().with_key_points(log_ticks(tmin * 0.7, tmax * 1.4)),
        )?;
    chart
        .configure_mesh()
        .x_desc("latency of a block (s, log scale)")
        .y_desc("generated tokens / s (log scale)")
        .label_style(("sans-serif", 16))
        .x_label_formatter(&|v| format!("{v}"))
        .y_label_formatter(&|v| format!("{v}"))
        .draw()?;
    let mut others = [MAGENTA, CYAN, BLACK].into_iter().cycle();
    for (name, mut pts) in series {
        pts.sort_by(|a, b| a.latency_s.total_cmp(&b.latency_s));
        let color = match (pts[0].system.as_str(), name == pts[0].system) {
            ("flexgen", true) => RGBColor(0, 150, 0),
            ("flexgen", false) => RGBColor(120, 200, 40),
            ("FlexLLMGen", _) => BLUE,
            ("HF Accelerate", _) => RED,
            _ => others.next().unwrap_or(BLACK),
        };
        // Points from an older build (the series names its session) are drawn in grey.
        let color = if name.contains("session") { RGBColor(150, 150, 150) } else { color };
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.latency_s, p.throughput)),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            pts.iter().map(|p| Circle::new((p.latency_s, p.throughput), 5, color.filled())),
        )?;
        chart.draw_series(pts.iter().map(|p| {
            EmptyElement::at((p.latency_s, p.throughput))
                + Text::new(p.label.clone(), (8, -18), ("sans-serif", 14).into_font())
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Ticks at 1, 2, 3 and 5 times the powers of ten inside `lo..hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi {
        out.extend([p, 2.0 * p, 3.0 * p, 5.0 * p].into_iter().filter(|v| (lo..=hi).contains(v)));
        p *= 10.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_one_two_three_five() {
        assert_eq!(log_ticks(12.0, 345.0), [20.0, 30.0, 50.0, 100.0, 200.0, 300.0]);
        assert_eq!(log_ticks(0.5, 3.0), [0.5, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_sweep_becomes_a_png() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("sweep.jsonl");
        std::fs::write(
            &input,
            "{\"system\":\"flexgen\",\"label\":\"8x1\",\"latency_s\":10,\"throughput\":20}\n\
             {\"system\":\"flexgen\",\"label\":\"32x2\",\"latency_s\":40,\"throughput\":55}\n\
             {\"system\":\"flexgen\",\"series\":\"flexgen, 4-bit\",\"label\":\"8x4\",\"latency_s\":30,\"throughput\":90}\n\
             {\"system\":\"FlexLLMGen\",\"label\":\"32x2\",\"latency_s\":44,\"throughput\":50}\n",
        )
        .unwrap();
        let out = dir.join("fig.png");
        let points = read(&input).unwrap();
        assert_eq!(
            points.iter().map(|p| p.series.as_str()).collect::<Vec<_>>(),
            ["flexgen", "flexgen", "flexgen, 4-bit", "FlexLLMGen"]
        );
        draw(&points, "OPT-30B", &out).unwrap();
        // A failed run is left out, not an error.
        std::fs::write(
            &input,
            "{\"system\":\"flexgen\",\"label\":\"8x1\",\"latency_s\":10,\"throughput\":20}\n\
             {\"system\":\"HF Accelerate\",\"label\":\"b128\",\"error\":\"timeout\"}\n",
        )
        .unwrap();
        assert_eq!(read(&input).unwrap().len(), 1);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "a real figure, {} bytes", bytes.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
