//! Reading a workload TOML file. Every error names the file and the dotted field.
//!
//! ```toml
//! seed = 7
//! count = 64                 # and/or duration_s = 60 (whichever ends first)
//! max_in_flight = 256
//! label = "pipelined"
//!
//! [arrival]
//! process = "poisson"        # or "closed"
//! rate = 2.0                 # poisson: requests per second
//! # concurrency = 4          # closed: requests kept in flight
//!
//! [mix]                      # relative weights
//! text = 3
//! image = 1
//! omni = 0
//! speech = 0
//!
//! [text]
//! prompt_words = { dist = "lognormal", mean = 24, sigma = 0.6, min = 1, max = 512 }
//! max_tokens = { dist = "uniform", min = 8, max = 64 }   # or a number: fixed
//! ignore_eos = true
//!
//! [image]
//! size = "64x64"
//! steps = 8
//! n = 1
//!
//! [sweep]
//! rates = [0.5, 1, 2, 4]     # or concurrency = [1, 2, 4]
//! ```

use super::workload::{Arrival, Dist, ImageShape, Kind, Sweep, Workload};
use std::path::Path;
use toml::{Table, Value};

/// A table being read, with where it is (for errors) and which keys were read (to refuse the
/// rest).
struct Fields<'a> {
    file: &'a str,
    prefix: String,
    table: &'a Table,
    read: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(file: &'a str, prefix: &str, table: &'a Table) -> Self {
        Fields {
            file,
            prefix: prefix.to_string(),
            table,
            read: Vec::new(),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn err(&self, key: &str, message: impl std::fmt::Display) -> String {
        format!("{}: field `{}`: {message}", self.file, self.path(key))
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.read.push(key);
        self.table.get(key)
    }

    fn number(&mut self, key: &'static str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(Value::Float(f)) if f.is_finite() => Ok(Some(*f)),
            Some(v) => Err(self.err(key, format!("expected a number, got {}", show(v)))),
        }
    }

    fn positive(&mut self, key: &'static str) -> Result<Option<f64>, String> {
        match self.number(key)? {
            Some(v) if v <= 0.0 => Err(self.err(key, format!("must be > 0, got {v}"))),
            v => Ok(v),
        }
    }

    fn count(&mut self, key: &'static str) -> Result<Option<u64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= 1 => Ok(Some(*i as u64)),
            Some(v) => Err(self.err(key, format!("expected a whole number ≥ 1, got {}", show(v)))),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<Option<&'a str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, format!("expected a string, got {}", show(v)))),
        }
    }

    fn boolean(&mut self, key: &'static str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {}", show(v)))),
        }
    }

    fn table(&mut self, key: &'static str) -> Result<Option<Fields<'a>>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(Fields::new(self.file, &self.path(key), t))),
            Some(v) => Err(self.err(key, format!("expected a table, got {}", show(v)))),
        }
    }

    /// Refuses keys nobody read: a misspelt field must not be silently ignored.
    fn finish(self) -> Result<(), String> {
        match self.table.keys().find(|k| !self.read.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let mut known = self.read.clone();
                known.dedup();
                Err(self.err(
                    k,
                    format!("unknown field; known here: {}", known.join(", ")),
                ))
            }
        }
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(40).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// Reads a workload file over the defaults.
pub fn load(path: &Path) -> Result<Workload, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the workload file: {e}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// Parses workload TOML (`file` names it in errors) over the defaults.
pub fn parse(text: &str, file: &str) -> Result<Workload, String> {
    let table: Table = text.parse().map_err(|e| format!("{file}: {e}"))?;
    let mut top = Fields::new(file, "", &table);
    let mut wl = Workload::default();
    if let Some(seed) = top.get("seed") {
        wl.seed = match seed {
            Value::Integer(i) if *i >= 0 => *i as u64,
            v => {
                return Err(top.err(
                    "seed",
                    format!("expected a whole number ≥ 0, got {}", show(v)),
                ))
            }
        };
    }
    wl.count = top.count("count")?;
    wl.duration_s = top.positive("duration_s")?;
    if let Some(m) = top.count("max_in_flight")? {
        wl.max_in_flight = m;
    }
    wl.label = top.string("label")?.map(str::to_string);
    if let Some(mut a) = top.table("arrival")? {
        let rate = a.positive("rate")?;
        let concurrency = a.count("concurrency")?;
        wl.arrival = match a.string("process")?.unwrap_or("poisson") {
            "poisson" => {
                if concurrency.is_some() {
                    return Err(a.err("concurrency", "only for process = \"closed\""));
                }
                Arrival::Poisson {
                    rate: rate.unwrap_or(1.0),
                }
            }
            "closed" => {
                if rate.is_some() {
                    return Err(a.err("rate", "only for process = \"poisson\""));
                }
                Arrival::Closed {
                    concurrency: concurrency.unwrap_or(1),
                }
            }
            other => {
                return Err(a.err(
                    "process",
                    format!("`{other}`: use \"poisson\" or \"closed\""),
                ))
            }
        };
        a.finish()?;
    }
    if let Some(mut m) = top.table("mix")? {
        let mut mix = [0.0; 4];
        for (slot, kind) in mix.iter_mut().zip(Kind::ALL) {
            if let Some(w) = m.number(kind.name())? {
                if w < 0.0 {
                    return Err(m.err(kind.name(), format!("weights must be ≥ 0, got {w}")));
                }
                *slot = w;
            }
        }
        let err = m.err("text", "at least one weight must be > 0");
        m.finish()?;
        if mix.iter().sum::<f64>() <= 0.0 {
            return Err(err);
        }
        wl.mix = mix;
    }
    if let Some(mut t) = top.table("text")? {
        if let Some(d) = dist(&mut t, "prompt_words")? {
            wl.prompt_words = d;
        }
        if let Some(d) = dist(&mut t, "max_tokens")? {
            wl.max_tokens = d;
        }
        if let Some(b) = t.boolean("ignore_eos")? {
            wl.ignore_eos = b;
        }
        t.finish()?;
    }
    if let Some(mut i) = top.table("image")? {
        if let Some(size) = i.string("size")? {
            check_size(size).map_err(|e| i.err("size", e))?;
            wl.image.size = size.to_string();
        }
        let ImageShape { steps, n, .. } = &mut wl.image;
        if let Some(s) = i.count("steps")? {
            *steps = s;
        }
        if let Some(v) = i.count("n")? {
            *n = v;
        }
        i.finish()?;
    }
    if let Some(mut s) = top.table("sweep")? {
        let rates = s.get("rates");
        let conc = s.get("concurrency");
        let sweep = match (rates, conc) {
            (Some(r), None) => Sweep::Rates(numbers(&s, "rates", r)?),
            (None, Some(c)) => Sweep::Concurrency(
                numbers(&s, "concurrency", c)?
                    .into_iter()
                    .map(|v| {
                        to_whole(v)
                            .ok_or_else(|| s.err("concurrency", "values must be whole numbers ≥ 1"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(s.err("rates", "give exactly one of `rates` or `concurrency`")),
        };
        let key = if matches!(sweep, Sweep::Rates(_)) {
            "rates"
        } else {
            "concurrency"
        };
        sweep.check().map_err(|e| s.err(key, e))?;
        wl.sweep = Some(sweep);
        s.finish()?;
    }
    top.finish()?;
    Ok(wl)
}

fn to_whole(v: f64) -> Option<u64> {
    (v >= 1.0 && v.fract() == 0.0 && v <= u32::MAX as f64).then_some(v as u64)
}

fn numbers(f: &Fields<'_>, key: &str, v: &Value) -> Result<Vec<f64>, String> {
    let bad = || f.err(key, format!("expected a list of numbers, got {}", show(v)));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    items
        .iter()
        .map(|v| match v {
            Value::Integer(i) => Ok(*i as f64),
            Value::Float(x) if x.is_finite() => Ok(*x),
            _ => Err(bad()),
        })
        .collect()
}

/// A distribution: a number (fixed) or `{dist = "fixed"|"uniform"|"lognormal", ...}`.
fn dist(parent: &mut Fields<'_>, key: &'static str) -> Result<Option<Dist>, String> {
    let Some(v) = parent.table.get(key) else {
        parent.read.push(key);
        return Ok(None);
    };
    if let Value::Integer(_) = v {
        let value = parent.count(key)?.unwrap_or(1);
        return Ok(Some(Dist::Fixed { value }));
    }
    let Some(mut f) = parent.table(key)? else {
        return Ok(None);
    };
    let d = match f.string("dist")? {
        Some("fixed") => Dist::Fixed {
            value: f
                .count("value")?
                .ok_or_else(|| f.err("value", "required for dist = \"fixed\""))?,
        },
        Some("uniform") => Dist::Uniform {
            min: f
                .count("min")?
                .ok_or_else(|| f.err("min", "required for dist = \"uniform\""))?,
            max: f
                .count("max")?
                .ok_or_else(|| f.err("max", "required for dist = \"uniform\""))?,
        },
        Some("lognormal") => {
            let sigma = f
                .number("sigma")?
                .ok_or_else(|| f.err("sigma", "required for dist = \"lognormal\""))?;
            if sigma < 0.0 {
                return Err(f.err("sigma", format!("must be ≥ 0, got {sigma}")));
            }
            let median = match (f.positive("mean")?, f.positive("median")?) {
                (Some(mean), None) => mean * (-sigma * sigma / 2.0).exp(),
                (None, Some(median)) => median,
                _ => return Err(f.err("mean", "give exactly one of `mean` or `median`")),
            };
            Dist::Lognormal {
                median,
                sigma,
                min: f.count("min")?.unwrap_or(1),
                max: f.count("max")?.unwrap_or(4096),
            }
        }
        Some(other) => {
            return Err(f.err(
                "dist",
                format!("`{other}`: use \"fixed\", \"uniform\" or \"lognormal\""),
            ))
        }
        None => return Err(f.err("dist", "required: \"fixed\", \"uniform\" or \"lognormal\"")),
    };
    if let Dist::Uniform { min, max } | Dist::Lognormal { min, max, .. } = d {
        if min > max {
            return Err(f.err("min", format!("must be ≤ max ({max}), got {min}")));
        }
    }
    f.finish()?;
    Ok(Some(d))
}

/// `WIDTHxHEIGHT` with both sides whole numbers (the server checks its own limits).
pub fn check_size(size: &str) -> Result<(), String> {
    let ok = size.split_once(['x', 'X']).is_some_and(|(w, h)| {
        w.trim().parse::<u32>().is_ok_and(|v| v > 0) && h.trim().parse::<u32>().is_ok_and(|v| v > 0)
    });
    if ok {
        Ok(())
    } else {
        Err(format!("`{size}`: expected WIDTHxHEIGHT, e.g. \"64x64\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let wl = parse(
            r#"
seed = 7
count = 10
duration_s = 30
max_in_flight = 8
label = "x"
[arrival]
process = "closed"
concurrency = 3
[mix]
text = 3
image = 1
speech = 0.5
[text]
prompt_words = { dist = "lognormal", mean = 24, sigma = 0.5, max = 100 }
max_tokens = 16
ignore_eos = false
[image]
size = "32x32"
steps = 3
n = 2
[sweep]
concurrency = [1, 2]
"#,
            "w.toml",
        )
        .unwrap();
        assert_eq!(
            (wl.seed, wl.count, wl.duration_s),
            (7, Some(10), Some(30.0))
        );
        assert_eq!(wl.arrival, Arrival::Closed { concurrency: 3 });
        assert_eq!(wl.mix, [3.0, 1.0, 0.0, 0.5]);
        assert_eq!(wl.max_tokens, Dist::Fixed { value: 16 });
        assert!(
            matches!(wl.prompt_words, Dist::Lognormal { min: 1, max: 100, median, .. } if median < 24.0)
        );
        assert_eq!(
            (wl.image.size.as_str(), wl.image.steps, wl.image.n),
            ("32x32", 3, 2)
        );
        assert_eq!(wl.sweep, Some(Sweep::Concurrency(vec![1, 2])));
        assert!(!wl.ignore_eos && wl.max_in_flight == 8 && wl.label.as_deref() == Some("x"));
        assert_eq!(parse("", "e.toml").unwrap(), Workload::default());
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        for (text, field) in [
            ("[arrival]\nrate = -1", "arrival.rate"),
            ("[arrival]\nrate = \"fast\"", "arrival.rate"),
            ("[arrival]\nprocess = \"bursty\"", "arrival.process"),
            ("[arrival]\nprocess = \"closed\"\nrate = 2", "arrival.rate"),
            ("[mix]\ntext = -1", "mix.text"),
            ("[mix]\nvideo = 1", "mix.video"),
            ("[mix]\ntext = 0", "mix.text"),
            ("cont = 3", "cont"),
            ("count = 0", "count"),
            (
                "[text]\nmax_tokens = { dist = \"uniform\", min = 9, max = 3 }",
                "text.max_tokens.min",
            ),
            (
                "[text]\nmax_tokens = { dist = \"zipf\" }",
                "text.max_tokens.dist",
            ),
            (
                "[text]\nprompt_words = { dist = \"lognormal\", sigma = 1 }",
                "text.prompt_words.mean",
            ),
            (
                "[text]\nprompt_words = { dist = \"fixed\", value = 2, extra = 1 }",
                "text.prompt_words.extra",
            ),
            ("[image]\nsize = \"big\"", "image.size"),
            ("[sweep]\nrates = [1, -2]", "sweep.rates"),
            ("[sweep]\nrates = \"1,2\"", "sweep.rates"),
        ] {
            let err = parse(text, "load.toml").unwrap_err();
            assert!(
                err.starts_with("load.toml: ") && err.contains(&format!("`{field}`")),
                "{text:?}: {err}"
            );
        }
        let err = parse("count = ", "bad.toml").unwrap_err();
        assert!(err.starts_with("bad.toml: "), "{err}");
        let err = load(Path::new("/nonexistent/w.toml")).unwrap_err();
        assert!(err.contains("/nonexistent/w.toml"), "{err}");
    }
}
