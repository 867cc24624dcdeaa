//! Message templates: `Hi {{name}}, your appointment is on {{date}}.`
//!
//! A [`Template`] is parsed once when a campaign is written; rendering is
//! strict, so a missing variable is an error and never an empty string in a
//! message that was already sent. The syntax is deliberately small (only
//! `{{ variable }}`): campaign bodies are short, and a full template language
//! would let a typo in a filter fail at send time instead of at import time.

use std::collections::BTreeSet;

/// A parsed message template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Variable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("template is empty")]
    Empty,
    #[error("template is longer than {MAX_TEMPLATE_CHARS} characters")]
    TooLong,
    #[error("'{{{{' at character {0} is never closed with '}}}}'")]
    Unclosed(usize),
    #[error("'{{{{{0}}}}}' is not a variable name (letters, digits, '_' and '.', not starting with a digit)")]
    BadName(String),
}

/// A variable that a recipient does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("missing template variable '{0}'")]
pub struct MissingVariable(pub String);

pub const MAX_TEMPLATE_CHARS: usize = 4096;

impl Template {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        if source.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        if source.chars().count() > MAX_TEMPLATE_CHARS {
            return Err(TemplateError::TooLong);
        }
        let mut parts = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after_open = &rest[open + 2..];
            let close = after_open.find("}}").ok_or(TemplateError::Unclosed(
                source[..offset + open].chars().count(),
            ))?;
            let name = after_open[..close].trim();
            if !is_variable_name(name) {
                return Err(TemplateError::BadName(name.to_owned()));
            }
            parts.push(Part::Variable(name.to_owned()));
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The distinct variable names the template uses, sorted.
    pub fn variables(&self) -> BTreeSet<&str> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Variable(name) => Some(name.as_str()),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// Renders the template, asking `lookup` for each variable's value.
    pub fn render<'a>(
        &self,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<String, MissingVariable> {
        let mut out = String::with_capacity(self.source.len() + 32);
        self.render_into(&mut out, lookup)?;
        Ok(out)
    }

    /// [`Template::render`] appending to `out`, which a caller rendering
    /// many messages reuses; on an error `out` holds part of the message.
    pub fn render_into<'a>(
        &self,
        out: &mut String,
        lookup: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<(), MissingVariable> {
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Variable(name) => {
                    let value = lookup(name).ok_or_else(|| MissingVariable(name.clone()))?;
                    out.push_str(value);
                }
            }
        }
        Ok(())
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// True when `name` can be a template variable (used for CSV headers and
/// JSON variable keys, so a contact cannot carry a variable no template can
/// name).
pub fn is_valid_variable_name(name: &str) -> bool {
    is_variable_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn renders_variables_in_place() {
        let t = Template::parse("Hi {{ name }}, see you {{date}}!").unwrap();
        let vars = HashMap::from([("name", "Ann"), ("date", "Monday")]);
        assert_eq!(
            t.render(|k| vars.get(k).copied()).unwrap(),
            "Hi Ann, see you Monday!"
        );
        assert_eq!(
            t.variables().into_iter().collect::<Vec<_>>(),
            ["date", "name"]
        );
    }

    #[test]
    fn missing_variable_is_an_error_not_a_blank() {
        let t = Template::parse("Hi {{name}}").unwrap();
        assert_eq!(t.render(|_| None), Err(MissingVariable("name".into())));
    }

    #[test]
    fn plain_text_has_no_variables() {
        let t = Template::parse("Hello there").unwrap();
        assert!(t.variables().is_empty());
        assert_eq!(t.render(|_| None).unwrap(), "Hello there");
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(Template::parse(""), Err(TemplateError::Empty));
        assert_eq!(
            Template::parse("Hi {{name"),
            Err(TemplateError::Unclosed(3))
        );
        assert!(matches!(
            Template::parse("{{}}"),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            Template::parse("{{ 1abc }}"),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            Template::parse("{{ a b }}"),
            Err(TemplateError::BadName(_))
        ));
        assert_eq!(
            Template::parse(&"x".repeat(MAX_TEMPLATE_CHARS + 1)),
            Err(TemplateError::TooLong)
        );
    }

    #[test]
    fn non_ascii_text_survives() {
        let t = Template::parse("Habari {{name}} 👋").unwrap();
        assert_eq!(t.render(|_| Some("Juma")).unwrap(), "Habari Juma 👋");
    }
}
