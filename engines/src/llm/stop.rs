//! Stop strings over streamed text: text that could still turn into a stop string is held back,
//! and the stop string itself never reaches the client.

/// Tracks one sequence's streamed text against its stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text decoded but not yet released (it may be the start of a stop string).
    held: String,
}

/// What the caller may send after pushing a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// Release this text (possibly empty) and keep going.
    Continue(String),
    /// A stop string matched: release this text (everything before the stop string) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Adds newly decoded text and says what may be released.
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return StopCheck::Continue(std::mem::take(&mut self.held));
        }
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let released = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stopped(released);
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let released = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck::Continue(released)
    }

    /// Releases whatever is held (the sequence ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of some stop string,
    /// always on a char boundary.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), StopCheck::Continue("abc".into()));
    }

    #[test]
    fn stop_split_across_pushes_is_held_then_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), StopCheck::Continue("hello ".into()));
        assert_eq!(m.push("N"), StopCheck::Continue(String::new()));
        assert_eq!(m.push("D and more"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("xE"), StopCheck::Continue("x".into()));
        assert_eq!(m.push("Nx"), StopCheck::Continue("ENx".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(m.push("abcd"), StopCheck::Stopped("a".into()));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["éz".into()]);
        assert_eq!(m.push("日本é"), StopCheck::Continue("日本".into()));
        assert_eq!(m.flush(), "é");
    }
}
