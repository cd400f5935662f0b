//! Serializes objects into one YAML stream: a comment on top, then the documents
//! separated by `---`, in the order they must be applied.

use serde::Serialize;

use crate::error::RenderError;

/// A YAML stream being built.
pub struct Documents {
    out: String,
    first: bool,
}

impl Documents {
    /// Starts a stream whose first lines are `header` as `# ` comments.
    pub fn new(header: &str) -> Self {
        let mut out = String::new();
        for line in header.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        Self { out, first: true }
    }

    /// Appends `value` as one document; `what` names it in an error.
    pub fn push<T: Serialize>(&mut self, what: &'static str, value: &T) -> Result<(), RenderError> {
        let doc = serde_yaml::to_string(value).map_err(|source| RenderError::Yaml { what, source })?;
        if !self.first {
            self.out.push_str("---\n");
        }
        self.first = false;
        self.out.push_str(&doc);
        Ok(())
    }

    pub fn finish(self) -> String {
        self.out
    }
}
