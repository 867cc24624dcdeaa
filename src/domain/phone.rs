//! Phone numbers and regions, parsed once at the edge.
//!
//! Everything past the API layer holds a [`PhoneNumber`], which is always in
//! E.164 form (`+` and digits), so no other code re-checks a number.

use std::fmt;

use phonenumber::{country, Mode, Type};

/// A phone number normalised to E.164 (`+15551234567`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhoneNumber(String);

/// An ISO 3166 region used to read numbers written without a `+` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(country::Id);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("'{0}' is not a phone number")]
    Unparseable(String),
    #[error("'{0}' has the wrong number of digits for its country")]
    ImpossibleLength(String),
}

impl PhoneNumber {
    /// Parses a number as a person would write it, reading a number without a
    /// country code as one of `region`.
    ///
    /// A number is accepted when libphonenumber calls it valid, or when it has
    /// a length that numbers of its country can have. The second rule keeps
    /// reserved test ranges such as +1 555 usable, as every SMS provider's
    /// sandbox uses them.
    pub fn parse(raw: &str, region: Region) -> Result<Self, PhoneError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        let parsed = phonenumber::parse(Some(region.0), trimmed)
            .map_err(|_| PhoneError::Unparseable(trimmed.to_owned()))?;
        // The length check first: it is a table lookup, where validity runs
        // the country's patterns (most of an import's time).
        if !has_possible_length(&parsed) && !phonenumber::is_valid(&parsed) {
            return Err(PhoneError::ImpossibleLength(trimmed.to_owned()));
        }
        Ok(Self(parsed.format().mode(Mode::E164).to_string()))
    }

    /// Trusts a number that was parsed before it was stored.
    pub fn from_trusted(e164: String) -> Self {
        Self(e164)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The number with its middle digits hidden, for logs and PII-less views.
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

/// Hides all but the first four and last two characters of a number.
pub fn mask_phone(number: &str) -> String {
    let chars: Vec<char> = number.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let hidden = chars.len() - 6;
    let mut out: String = chars[..4].iter().collect();
    out.push_str(&"*".repeat(hidden));
    out.extend(&chars[chars.len() - 2..]);
    out
}

fn has_possible_length(number: &phonenumber::PhoneNumber) -> bool {
    let digits = number.national().to_string().len() as u16;
    // Reserved ranges match no region's patterns, so look the country code
    // up directly rather than through the number's own metadata.
    let Some(regions) = phonenumber::metadata::DATABASE.by_code(&number.code().value()) else {
        return false;
    };
    // The general descriptor's lengths are often empty in the bundled
    // metadata; the per-type descriptors carry them.
    const KINDS: [Type; 4] = [Type::Unknown, Type::FixedLine, Type::Mobile, Type::TollFree];
    regions.iter().any(|meta| {
        KINDS.iter().any(|kind| {
            meta.descriptors()
                .get(*kind)
                .is_some_and(|d| d.possible_length().contains(&digits))
        })
    })
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Region {
    pub fn parse(code: &str) -> Result<Self, String> {
        code.trim()
            .to_ascii_uppercase()
            .parse::<country::Id>()
            .map(Self)
            .map_err(|_| format!("'{code}' is not an ISO 3166 region code such as US or GB"))
    }

    /// The two-letter code, e.g. `US`.
    pub fn code(&self) -> &str {
        self.0.as_ref()
    }
}

impl Default for Region {
    fn default() -> Self {
        Self(country::Id::US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us() -> Region {
        Region::parse("US").unwrap()
    }

    #[test]
    fn national_format_becomes_e164() {
        let n = PhoneNumber::parse("(202) 555-0143", us()).unwrap();
        assert_eq!(n.as_str(), "+12025550143");
    }

    #[test]
    fn international_number_ignores_region() {
        let n = PhoneNumber::parse("+44 20 7946 0958", us()).unwrap();
        assert_eq!(n.as_str(), "+442079460958");
    }

    #[test]
    fn seed_style_555_numbers_are_accepted() {
        let n = PhoneNumber::parse("+15551234567", us()).unwrap();
        assert_eq!(n.as_str(), "+15551234567");
    }

    #[test]
    fn region_changes_how_local_numbers_read() {
        let tz = Region::parse("tz").unwrap();
        let n = PhoneNumber::parse("0712 345 678", tz).unwrap();
        assert_eq!(n.as_str(), "+255712345678");
    }

    #[test]
    fn garbage_and_wrong_lengths_are_refused() {
        assert_eq!(PhoneNumber::parse("  ", us()), Err(PhoneError::Empty));
        assert!(matches!(
            PhoneNumber::parse("hello", us()),
            Err(PhoneError::Unparseable(_))
        ));
        assert!(PhoneNumber::parse("12", us()).is_err());
        assert!(PhoneNumber::parse("+1 202 555 01430000", us()).is_err());
    }

    #[test]
    fn masking_keeps_only_the_ends() {
        assert_eq!(mask_phone("+15551234567"), "+155******67");
        assert_eq!(mask_phone("123"), "***");
    }

    #[test]
    fn unknown_region_is_refused() {
        assert!(Region::parse("XX").is_err());
        assert_eq!(Region::parse("gb").unwrap().code(), "GB");
    }
}
