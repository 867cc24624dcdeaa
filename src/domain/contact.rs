//! Contacts: a phone number, an optional name and the variables a template
//! may use, read from JSON or from a CSV row.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use utoipa::ToSchema;

use super::phone::{PhoneNumber, Region};

/// Longest value a contact's name or variable may hold.
pub const MAX_VALUE_CHARS: usize = 1024;
/// Most variables one contact may carry.
pub const MAX_VARIABLES: usize = 64;

/// A contact that passed every check and may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewContact {
    pub phone: PhoneNumber,
    pub name: Option<String>,
    pub variables: BTreeMap<String, String>,
}

/// Why one contact of an import was refused. CSV errors carry the line,
/// JSON errors the index in the `contacts` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ContactError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The column (CSV) or field (JSON) at fault.
    pub column: String,
    pub reason: String,
}

/// The value a template variable takes for a recipient: `phone` and `name`
/// come from the recipient itself (a missing name from its `name` variable),
/// anything else from its variables. One rule for the import's check, the
/// engine's sends and the rendered messages a page shows.
/// `variables` looks a name up in the recipient's variables, however they
/// are held.
pub fn variable_value<'a>(
    phone: &'a str,
    name: Option<&'a str>,
    variables: impl Fn(&str) -> Option<&'a str>,
    variable: &str,
) -> Option<&'a str> {
    match variable {
        "phone" => Some(phone),
        "name" => name.or_else(|| variables("name")),
        other => variables(other),
    }
}

impl NewContact {
    /// The value a template variable takes for this contact ([`variable_value`]).
    pub fn lookup(&self, variable: &str) -> Option<&str> {
        variable_value(
            self.phone.as_str(),
            self.name.as_deref(),
            |v| self.variables.get(v).map(String::as_str),
            variable,
        )
    }

    /// The first of `required` this contact cannot fill, if any.
    pub fn first_missing<'a>(&self, required: &BTreeSet<&'a str>) -> Option<&'a str> {
        required
            .iter()
            .copied()
            .find(|variable| self.lookup(variable).is_none())
    }

    /// Merges a duplicate of the same number: later values win.
    pub fn merge(&mut self, later: NewContact) {
        if later.name.is_some() {
            self.name = later.name;
        }
        self.variables.extend(later.variables);
    }
}

/// Checks a name or variable value; empty means "absent".
pub fn clean_value(raw: &str) -> Result<Option<String>, String> {
    let value = raw.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > MAX_VALUE_CHARS {
        return Err(format!("value is longer than {MAX_VALUE_CHARS} characters"));
    }
    // Postgres cannot store one in text, and no name or variable needs one.
    if value.contains('\0') {
        return Err("value contains a NUL character".to_owned());
    }
    Ok(Some(value.to_owned()))
}

/// How a CSV file's columns map to contact fields, read from its header row.
#[derive(Debug, Clone)]
pub struct CsvLayout {
    phone: usize,
    name: Option<usize>,
    /// `(column index, variable name)` for every other named column.
    variables: Vec<(usize, String)>,
}

impl CsvLayout {
    /// Reads the header row. `phone` is required; `name` is optional; every
    /// other non-empty header becomes a template variable.
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut phone = None;
        let mut name = None;
        let mut variables = Vec::new();
        let mut seen = BTreeSet::new();
        for (index, raw) in headers.into_iter().enumerate() {
            let header = raw.trim_start_matches('\u{feff}').trim();
            if header.is_empty() {
                continue;
            }
            let key = header.to_ascii_lowercase();
            if !seen.insert(key.clone()) {
                return Err(format!("column '{header}' appears twice in the header row"));
            }
            match key.as_str() {
                "phone" => phone = Some(index),
                "name" => name = Some(index),
                _ => variables.push((index, header.to_owned())),
            }
        }
        if variables.len() > MAX_VARIABLES {
            return Err(format!(
                "at most {MAX_VARIABLES} variable columns are allowed"
            ));
        }
        let phone = phone.ok_or("the header row has no 'phone' column")?;
        Ok(Self {
            phone,
            name,
            variables,
        })
    }

    pub fn variable_names(&self) -> impl Iterator<Item = &str> {
        self.variables.iter().map(|(_, name)| name.as_str())
    }

    /// Reads one data row. On error, returns the column at fault and why.
    pub fn contact<'a>(
        &self,
        cell: impl Fn(usize) -> Option<&'a str>,
        region: Region,
    ) -> Result<NewContact, (String, String)> {
        let phone = PhoneNumber::parse(cell(self.phone).unwrap_or(""), region)
            .map_err(|e| ("phone".to_owned(), e.to_string()))?;
        let name = match self.name {
            Some(i) => clean_value(cell(i).unwrap_or("")).map_err(|e| ("name".to_owned(), e))?,
            None => None,
        };
        let mut variables = BTreeMap::new();
        for (index, variable) in &self.variables {
            if let Some(value) =
                clean_value(cell(*index).unwrap_or("")).map_err(|e| (variable.clone(), e))?
            {
                variables.insert(variable.clone(), value);
            }
        }
        Ok(NewContact {
            phone,
            name,
            variables,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(headers: &[&str]) -> Result<CsvLayout, String> {
        CsvLayout::from_headers(headers.iter().copied())
    }

    #[test]
    fn header_maps_phone_name_and_variables() {
        let l = layout(&["\u{feff}Phone", "name", "appointment_date"]).unwrap();
        let row = ["(202) 555-0143", " Ann ", "Monday"];
        let c = l
            .contact(|i| row.get(i).copied(), Region::default())
            .unwrap();
        assert_eq!(c.phone.as_str(), "+12025550143");
        assert_eq!(c.name.as_deref(), Some("Ann"));
        assert_eq!(c.lookup("appointment_date"), Some("Monday"));
        assert_eq!(c.lookup("phone"), Some("+12025550143"));
    }

    #[test]
    fn header_without_phone_or_with_twins_is_refused() {
        assert!(layout(&["name", "x"]).unwrap_err().contains("'phone'"));
        assert!(layout(&["phone", "x", "X"]).unwrap_err().contains("twice"));
    }

    #[test]
    fn empty_cells_are_absent_values() {
        let l = layout(&["phone", "date"]).unwrap();
        let row = ["+15551234567", "  "];
        let c = l
            .contact(|i| row.get(i).copied(), Region::default())
            .unwrap();
        let required = BTreeSet::from(["date"]);
        assert_eq!(c.first_missing(&required), Some("date"));
    }

    #[test]
    fn bad_phone_names_the_column() {
        let l = layout(&["phone"]).unwrap();
        let err = l
            .contact(|_| Some("not a number"), Region::default())
            .unwrap_err();
        assert_eq!(err.0, "phone");
    }

    #[test]
    fn merge_keeps_earlier_values_unless_overridden() {
        let l = layout(&["phone", "name", "a", "b"]).unwrap();
        let first = ["+15551234567", "Ann", "1", "2"];
        let second = ["+15551234567", "", "9", ""];
        let mut c = l
            .contact(|i| first.get(i).copied(), Region::default())
            .unwrap();
        c.merge(
            l.contact(|i| second.get(i).copied(), Region::default())
                .unwrap(),
        );
        assert_eq!(c.name.as_deref(), Some("Ann"));
        assert_eq!(c.lookup("a"), Some("9"));
        assert_eq!(c.lookup("b"), Some("2"));
    }

    #[test]
    fn a_value_with_a_nul_character_is_refused() {
        assert_eq!(clean_value(" Ann "), Ok(Some("Ann".to_owned())));
        assert_eq!(
            clean_value("An\0n"),
            Err("value contains a NUL character".to_owned())
        );
    }
}
