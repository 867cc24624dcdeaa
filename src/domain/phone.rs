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
        match Self::parse_plain_e164(trimmed, region) {
            Some(number) => Ok(number),
            None => Self::parse_general(trimmed, region),
        }
    }

    /// Any way of writing a number that libphonenumber understands.
    fn parse_general(trimmed: &str, region: Region) -> Result<Self, PhoneError> {
        let parsed = phonenumber::parse(Some(region.0), trimmed)
            .map_err(|_| PhoneError::Unparseable(trimmed.to_owned()))?;
        // The length check first: it is a table lookup, where validity runs
        // the country's patterns (most of an import's time).
        if !has_possible_length(&parsed) && !phonenumber::is_valid(&parsed) {
            return Err(PhoneError::ImpossibleLength(trimmed.to_owned()));
        }
        Ok(Self(parsed.format().mode(Mode::E164).to_string()))
    }

    /// The common case of an import, a number already written as `+` and
    /// digits, without libphonenumber's general parser (its combinators
    /// and regexes were a third of a million-row import's CPU). It answers
    /// only when the general parser would give the same number — none of
    /// the rules that rewrite a number applies — and leaves everything
    /// else, including rejections, to [`PhoneNumber::parse`]'s slow path.
    fn parse_plain_e164(trimmed: &str, region: Region) -> Option<Self> {
        let digits = trimmed.strip_prefix('+')?;
        if !(8..=15).contains(&digits.len())
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || digits.starts_with('0')
        {
            return None;
        }
        let database = &*phonenumber::metadata::DATABASE;
        // Country codes are prefix-free: the first prefix known is the one.
        let (regions, national) = (1..=3).find_map(|len| {
            let code: u16 = digits[..len].parse().ok()?;
            database
                .by_code(&code)
                .map(|regions| (regions, &digits[len..]))
        })?;
        // The rules below are the general parser's, with the default
        // region's metadata as it applies them: an international dialling
        // prefix after the `+`, a national prefix (or its parsing pattern)
        // at the start of the national number.
        let meta = database.by_id(region.code())?;
        let idd_at = meta.international_prefix().and_then(|re| re.find(digits));
        let prefix_at = meta
            .national_prefix_for_parsing()
            .and_then(|re| re.find(national));
        if idd_at.map(|m| m.start()) == Some(0)
            || prefix_at.map(|m| m.start()) == Some(0)
            || meta
                .national_prefix()
                .is_some_and(|p| national.starts_with(p))
        {
            return None;
        }
        possible_length(&regions, national.len()).then(|| Self(trimmed.to_owned()))
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
    // Reserved ranges match no region's patterns, so look the country code
    // up directly rather than through the number's own metadata.
    phonenumber::metadata::DATABASE
        .by_code(&number.code().value())
        .is_some_and(|regions| possible_length(&regions, number.national().to_string().len()))
}

/// Whether numbers of a country (its `regions`, as the metadata lists them
/// under its code) can have `digits` national digits.
fn possible_length(regions: &[&phonenumber::metadata::Metadata], digits: usize) -> bool {
    let Ok(digits) = u16::try_from(digits) else {
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

    /// The fast path must never disagree with the general parser: every
    /// country code, national numbers of every length starting with every
    /// digit (national prefixes, trunk zeros), read with regions whose
    /// prefixes differ.
    #[test]
    fn plain_e164_fast_path_agrees_with_the_general_parser() {
        let regions = [
            "US", "GB", "DE", "IT", "TZ", "RU", "BR", "IN", "HU", "AR", "MX", "JP",
        ];
        let database = &*phonenumber::metadata::DATABASE;
        let (mut state, mut answered) = (0x9e37_79b9_7f4a_7c15u64, 0usize);
        let mut random_digits = |n: usize| -> String {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    char::from(b'0' + ((state >> 33) % 10) as u8)
                })
                .collect()
        };
        for code in (1u16..=999).filter(|c| database.by_code(c).is_some()) {
            for len in 4..=13 {
                for first in '0'..='9' {
                    let national = format!("{first}{}", random_digits(len - 1));
                    let raw = format!("+{code}{national}");
                    for region in regions {
                        let region = Region::parse(region).unwrap();
                        let Some(fast) = PhoneNumber::parse_plain_e164(&raw, region) else {
                            continue;
                        };
                        answered += 1;
                        assert_eq!(
                            PhoneNumber::parse_general(&raw, region),
                            Ok(fast),
                            "{raw} read in {}",
                            region.code()
                        );
                    }
                }
            }
        }
        // The fast path must also be taken, or this proves nothing.
        assert!(answered > 10_000, "fast path answered only {answered}");
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
