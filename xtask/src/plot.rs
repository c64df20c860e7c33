//! `cargo xtask plot --input SWEEP.jsonl[,MORE.jsonl…] --out FIG.png [--title TEXT]`: the
//! latency–throughput figure of the original README, from a sweep. Each input line is one run:
//! `{"system": "flexgen", "label": "32×2", "latency_s": 40.1, "throughput": 56.7}` (latency: the
//! time of one block, prompt to last token; throughput: generated tokens per second); a line
//! with an `error` (a run that failed or was killed) is left out with a note. One series per
//! system, points joined in order of latency and labelled.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One point of a sweep.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub(crate) system: String,
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
        out.push(Point {
            system: v["system"].as_str().unwrap_or("?").to_string(),
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
        series.entry(p.system.as_str()).or_default().push(p);
    }
    let (lmin, lmax) =
        points.iter().fold((f64::MAX, 0f64), |(a, b), p| (a.min(p.latency_s), b.max(p.latency_s)));
    let tmax = points.iter().map(|p| p.throughput).fold(0f64, f64::max);
    let root = BitMapBackend::new(out, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((lmin * 0.8..lmax * 1.25).log_scale(), 0.0..tmax * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("latency of a block (s, log scale)")
        .y_desc("generated tokens / s")
        .label_style(("sans-serif", 16))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, mut pts)) in series.into_iter().enumerate() {
        pts.sort_by(|a, b| a.latency_s.total_cmp(&b.latency_s));
        let color = colors[i % colors.len()];
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
            Text::new(
                p.label.clone(),
                (p.latency_s, p.throughput * 1.02),
                ("sans-serif", 14).into_font(),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_becomes_a_png() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("sweep.jsonl");
        std::fs::write(
            &input,
            "{\"system\":\"flexgen\",\"label\":\"8x1\",\"latency_s\":10,\"throughput\":20}\n\
             {\"system\":\"flexgen\",\"label\":\"32x2\",\"latency_s\":40,\"throughput\":55}\n\
             {\"system\":\"FlexLLMGen\",\"label\":\"32x2\",\"latency_s\":44,\"throughput\":50}\n",
        )
        .unwrap();
        let out = dir.join("fig.png");
        draw(&read(&input).unwrap(), "OPT-30B", &out).unwrap();
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
