//! SVG charts for benchmark reports, drawn with plotters (its SVG backend alone: no font files
//! are needed, text is left to the viewer).

use plotters::prelude::*;

/// One bar: a label, the median and the spread (min, max) drawn as a whisker.
#[derive(Clone, Debug)]
pub struct Bar {
    pub label: String,
    /// Index into the palette: the same topology has the same colour in every chart.
    pub color: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// One line: a label and its points.
#[derive(Clone, Debug)]
pub struct Line {
    pub label: String,
    /// Index into the palette.
    pub color: usize,
    pub points: Vec<(f64, f64)>,
}

const WIDTH_PX: u32 = 900;
const HEIGHT_PX: u32 = 480;
const PANEL_HEIGHT_PX: u32 = 280;

fn failed<E: std::fmt::Display>(e: E) -> String {
    format!("drawing a chart: {e}")
}

/// Bar panels one above the other, one per `(title, y label, bars)`, in one SVG.
pub fn bar_panels(panels: &[(&str, &str, Vec<Bar>)]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let height = PANEL_HEIGHT_PX * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, height)).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for ((title, y_label, bars), area) in panels.iter().zip(areas.iter()) {
            let top = bars.iter().map(|b| b.max.max(b.median)).fold(0.0, f64::max);
            let top = if top > 0.0 { top * 1.15 } else { 1.0 };
            let n = bars.len().max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
                .map_err(failed)?;
            let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n)
                .x_label_formatter(&|x| category(&labels, *x))
                .x_label_style(("sans-serif", 13))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .y_desc(*y_label)
                .draw()
                .map_err(failed)?;
            chart
                .draw_series(bars.iter().enumerate().map(|(i, b)| {
                    let x = i as f64;
                    Rectangle::new(
                        [(x - 0.35, 0.0), (x + 0.35, b.median)],
                        Palette99::pick(b.color).filled(),
                    )
                }))
                .map_err(failed)?;
            chart
                .draw_series(bars.iter().enumerate().map(|(i, b)| {
                    let x = i as f64;
                    PathElement::new(vec![(x, b.min), (x, b.max)], BLACK.stroke_width(2))
                }))
                .map_err(failed)?;
        }
        root.present().map_err(failed)?;
    }
    Ok(svg)
}

/// Lines over named categories on the x axis (`x_names[i]` at x = i), the y axis logarithmic.
pub fn category_lines_log(
    title: &str,
    x_names: &[&str],
    y_label: &str,
    lines: &[Line],
) -> Result<String, String> {
    let values = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let lo = values().filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let hi = values().fold(0.0, f64::max);
    let (lo, hi) = if lo <= hi && hi > 0.0 {
        (lo / 1.5, hi * 1.5)
    } else {
        (1.0, 10.0)
    };
    let names: Vec<String> = x_names.iter().map(|s| s.to_string()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let n = x_names.len().max(2);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.2f64..(n as f64 - 0.8), (lo..hi).log_scale())
            .map_err(failed)?;
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| category(&names, *x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc(y_label)
            .draw()
            .map_err(failed)?;
        draw_lines(&mut chart, lines)?;
        root.present().map_err(failed)?;
    }
    Ok(svg)
}

/// Lines on linear axes.
pub fn lines(title: &str, x_label: &str, y_label: &str, lines: &[Line]) -> Result<String, String> {
    let xs = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let ys = || lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let x_hi = xs().fold(1.0, f64::max);
    let y_hi = ys().fold(1.0, f64::max) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_hi, 0f64..y_hi)
            .map_err(failed)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(failed)?;
        draw_lines(&mut chart, lines)?;
        root.present().map_err(failed)?;
    }
    Ok(svg)
}

fn draw_lines<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[Line],
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for line in lines {
        let color = Palette99::pick(line.color).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(failed)?
            .label(line.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                line.points
                    .iter()
                    .map(|p| Circle::new(*p, 3, color.filled())),
            )
            .map_err(failed)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)
}

/// The name of the category at `x` when `x` is (close to) a whole index, else nothing.
fn category(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    names.get(i as usize).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_naming_what_they_show() {
        let bars = vec![
            Bar {
                label: "direct".into(),
                color: 0,
                median: 100.0,
                min: 90.0,
                max: 110.0,
            },
            Bar {
                label: "sidecar".into(),
                color: 1,
                median: 40.0,
                min: 35.0,
                max: 45.0,
            },
        ];
        let svg = bar_panels(&[("req/s", "requests per second", bars)]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(
            has_text(&svg, "direct") && has_text(&svg, "sidecar"),
            "{svg}"
        );
        let line = Line {
            label: "ambient".into(),
            color: 0,
            points: vec![(0.0, 50.0), (1.0, 90.0), (2.0, 400.0)],
        };
        let svg = category_lines_log(
            "latency",
            &["p50", "p90", "p99"],
            "µs",
            std::slice::from_ref(&line),
        )
        .unwrap();
        assert!(has_text(&svg, "p99") && has_text(&svg, "ambient"), "{svg}");
        let svg = lines("memory", "pods", "MiB", &[line]).unwrap();
        assert!(has_text(&svg, "ambient"));
    }

    /// Whether a `<text>` element of the SVG says exactly `what`.
    fn has_text(svg: &str, what: &str) -> bool {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split("</text>").next()?.trim()))
            .any(|t| t == what)
    }
}
