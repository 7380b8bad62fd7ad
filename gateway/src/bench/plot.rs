//! PNG line charts with plotters: the JCT CDF per kind, JCT over the run, and latency-vs-load
//! curves.
//!
//! Pixels are drawn into a buffer (plotters' bitmap backend) and encoded with the PNG encoder
//! the gateway already links for `/v1/images/generations`, instead of plotters' own encoder,
//! which would pull a second `image` crate (with JPEG and BMP) into the build.
//!
//! Text needs a font: `ab_glyph` draws only fonts registered at run time and loads none itself,
//! so a TTF is looked for in the usual system places ([`find_font`]). Without one the charts are
//! still written, with lines, markers and grid but no text, and a warning says so — a bench run
//! on a bare CI machine still leaves something to look at.

use omnistage_stages::RgbImages;
use plotters::backend::RGBPixel;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The family fonts are registered under; plotters' default text style asks for it.
const FAMILY: &str = "sans-serif";

/// Used for every text style when no font is registered: a family nobody registers, so any
/// text drawn by mistake fails loudly (in tests) instead of silently needing a font.
const NO_FONT: &str = "omnistage-no-font";

/// Where a sans-serif TTF usually is: Debian/Ubuntu, Fedora/RHEL, Arch, Alpine.
const FONT_CANDIDATES: [&str; 8] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// A TTF to draw text with: `$OMNISTAGE_FONT`, else the first of [`FONT_CANDIDATES`] present,
/// else any `DejaVuSans.ttf` / `LiberationSans-Regular.ttf` a few levels under
/// `/usr/share/fonts`.
pub fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OMNISTAGE_FONT").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(p) = FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let mut dirs = vec![(PathBuf::from("/usr/share/fonts"), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && depth < 3 {
                dirs.push((p, depth + 1));
            } else if p
                .file_name()
                .is_some_and(|n| n == "DejaVuSans.ttf" || n == "LiberationSans-Regular.ttf")
            {
                return Some(p);
            }
        }
    }
    None
}

/// Registers a system font once per process; `true` when text can be drawn. Prints a warning
/// the first time none is found.
pub fn fonts() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let registered = find_font().and_then(|path| {
            let bytes = std::fs::read(&path).ok()?;
            // plotters keeps fonts for the whole process; this runs once, so leaking is bounded.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).ok()
        });
        if registered.is_none() {
            eprintln!(
                "warning: no TTF font found (looked for DejaVuSans / LiberationSans under \
                 /usr/share/fonts; set OMNISTAGE_FONT=FILE.ttf): plots are drawn without text"
            );
        }
        registered.is_some()
    })
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Index into the palette; series sharing a color are told apart by `dashed`.
    pub color: usize,
    pub dashed: bool,
    /// Draw a marker at each point; `false` draws the line only.
    pub markers: bool,
    /// Markers only, no line (a scatter).
    pub scatter: bool,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    /// Fixed y range (a CDF's 0–1); otherwise from the data.
    pub y_range: Option<(f64, f64)>,
}

const SIZE: (u32, u32) = (960, 600);

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `chart` into a PNG at `path`; `text` draws the title, axis labels and legend (needs
/// [`fonts`]).
pub fn draw(path: &Path, chart: &Chart, text: bool) -> Result<(), String> {
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    render(&mut buf, chart, text).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    let image = RgbImages {
        pixels: Arc::from(buf),
        n: 1,
        height: h as usize,
        width: w as usize,
    };
    let png = omnistage_engines::diffusion::png::encode_png(&image, 0)
        .map_err(|e| format!("cannot encode {}: {e}", path.display()))?;
    std::fs::write(path, png).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The data's range padded by 5% (and never empty).
fn span(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

fn render(buf: &mut [u8], chart: &Chart, text: bool) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::<RGBPixel>::with_buffer_and_format(buf, SIZE)?.into_drawing_area();
    root.fill(&WHITE)?;
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = span(points().map(|p| p.0), true);
    let (y0, y1) = chart
        .y_range
        .unwrap_or_else(|| span(points().map(|p| p.1), true));
    let font = if text { FAMILY } else { NO_FONT };
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(&chart.title, (FAMILY, 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut ctx = builder.build_cartesian_2d(x0..x1, y0..y1)?;
    let mut mesh = ctx.configure_mesh();
    mesh.label_style((font, 14)).axis_desc_style((font, 15));
    if text {
        mesh.x_desc(chart.x_desc.as_str())
            .y_desc(chart.y_desc.as_str());
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    if !text {
        // Frame the plot area: without label areas the mesh draws no axes.
        let (xr, yr) = (ctx.x_range(), ctx.y_range());
        ctx.draw_series(std::iter::once(Rectangle::new(
            [(xr.start, yr.start), (xr.end, yr.end)],
            BLACK.stroke_width(1),
        )))?;
    }
    for s in &chart.series {
        let color = PALETTE[s.color % PALETTE.len()];
        let style = color.stroke_width(2);
        let anno = if s.scatter {
            ctx.draw_series(s.points.iter().map(|p| Circle::new(*p, 2, color.filled())))?
        } else if s.dashed {
            ctx.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, style))?
        } else {
            ctx.draw_series(LineSeries::new(s.points.iter().copied(), style))?
        };
        if text && s.scatter {
            anno.label(s.label.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        } else if text && s.dashed {
            anno.label(s.label.as_str()).legend(move |(x, y)| {
                let style = color.stroke_width(2);
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (7, 0)], style)
                    + PathElement::new(vec![(13, 0), (20, 0)], style)
            });
        } else if text {
            anno.label(s.label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        if s.markers && !s.scatter {
            ctx.draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
    }
    if text && chart.series.iter().any(|s| !s.label.is_empty()) {
        ctx.configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart() -> Chart {
        Chart {
            title: "t".into(),
            x_desc: "x".into(),
            y_desc: "y".into(),
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)],
                    color: 0,
                    dashed: false,
                    markers: true,
                    scatter: false,
                },
                Series {
                    label: "b".into(),
                    points: vec![(0.5, 1.0), (1.5, 2.5)],
                    color: 1,
                    dashed: true,
                    markers: false,
                    scatter: false,
                },
                Series {
                    label: "c".into(),
                    points: vec![(0.2, 0.2)],
                    color: 2,
                    dashed: false,
                    markers: false,
                    scatter: true,
                },
            ],
            y_range: None,
        }
    }

    /// Drawing without a font must work: CI machines may have none, and text drawn by mistake
    /// fails here because the no-font style names a family nobody registers.
    #[test]
    fn charts_draw_without_any_font() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        draw(&path, &chart(), false).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // Empty data still draws.
        let empty = Chart {
            series: vec![],
            ..chart()
        };
        draw(&path, &empty, false).unwrap();
    }

    #[test]
    fn charts_draw_with_text_when_a_font_is_there() {
        if !fonts() {
            return; // nothing to check on a machine without fonts
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        draw(&path, &chart(), true).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }
}
