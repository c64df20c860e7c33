//! Turning the decoded text of a growing token sequence into printable deltas: text is held back
//! while it ends in an incomplete UTF-8 character (decoded as U+FFFD) or in what may be the start
//! of a stop string, and cut before the first stop string found.

pub(crate) struct TextStream {
    stops: Vec<String>,
    emitted: usize,
    text: String,
}

impl TextStream {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            emitted: 0,
            text: String::new(),
        }
    }

    /// Whether the text is watched for stop strings.
    pub(crate) fn has_stops(&self) -> bool {
        !self.stops.is_empty()
    }

    /// Takes the decoded text of all tokens so far; returns the new printable text and whether a
    /// stop string was reached. With `last`, everything left is released.
    pub(crate) fn update(&mut self, full: &str, last: bool) -> (String, bool) {
        let cut = self.stops.iter().filter_map(|s| full.find(s.as_str())).min();
        let visible = &full[..cut.unwrap_or(full.len())];
        let end = if cut.is_some() || last {
            visible.len()
        } else {
            visible.len() - self.held_back(visible)
        };
        let delta = if end > self.emitted && visible.is_char_boundary(self.emitted) {
            let d = visible[self.emitted..end].to_string();
            self.emitted = end;
            d
        } else {
            String::new()
        };
        self.text = visible.to_string();
        (delta, cut.is_some())
    }

    /// Bytes at the end of `text` that may still change: a trailing replacement character, or the
    /// longest suffix that begins a stop string.
    fn held_back(&self, text: &str) -> usize {
        if text.ends_with('\u{FFFD}') {
            return text.len() - text.trim_end_matches('\u{FFFD}').len();
        }
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    /// The text so far, cut before a stop string.
    pub(crate) fn final_text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], steps: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_string()).collect();
        let mut s = TextStream::new(&stops);
        let mut out = Vec::new();
        let mut hit = false;
        for (i, full) in steps.iter().enumerate() {
            let (d, h) = s.update(full, i + 1 == steps.len());
            out.push(d);
            hit |= h;
            if h {
                break;
            }
        }
        (out, hit, s.final_text().to_string())
    }

    #[test]
    fn plain_text_streams_as_it_grows() {
        let (d, hit, text) = run(&[], &["a", "ab", "abc"]);
        assert_eq!(d, ["a", "b", "c"]);
        assert!(!hit);
        assert_eq!(text, "abc");
    }

    #[test]
    fn partial_characters_wait_for_completion() {
        let (d, ..) = run(&[], &["a\u{FFFD}", "aé", "aé!"]);
        assert_eq!(d, ["a", "é", "!"]);
    }

    #[test]
    fn a_stop_string_cuts_the_text_and_is_never_printed() {
        let (d, hit, text) = run(&["\n\n"], &["Hi", "Hi\n", "Hi\n\nBye"]);
        assert_eq!(d, ["Hi", "", ""]);
        assert!(hit);
        assert_eq!(text, "Hi");
    }

    #[test]
    fn a_false_start_of_a_stop_string_is_released() {
        let (d, hit, _) = run(&["END"], &["x E", "x EN", "x ENV"]);
        assert_eq!(d, ["x ", "", "ENV"]);
        assert!(!hit);
    }
}
