//! SMS segmentation: how many billable parts a message takes.
//!
//! A message that fits the GSM 03.38 alphabet is 7-bit: 160 characters in one
//! part, 153 per part when concatenated (the rest carries the UDH header).
//! Anything else is sent as UCS-2: 70 in one part, 67 per part.

/// Characters of the GSM 7-bit default alphabet (one septet each).
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// Characters of the extension table: each costs two septets (escape + char).
const GSM7_EXTENDED: &str = "^{}\\[~]|€\u{000C}";

/// Septets per ASCII character, 0 when it is not in the alphabet: most
/// text is ASCII, and scanning the alphabet per character showed up in
/// pricing a million-recipient run.
const ASCII_SEPTETS: [u8; 128] = ascii_septets();

const fn ascii_septets() -> [u8; 128] {
    let mut table = [0u8; 128];
    let (basic, extended) = (GSM7_BASIC.as_bytes(), GSM7_EXTENDED.as_bytes());
    let mut i = 0;
    while i < basic.len() {
        if basic[i] < 128 {
            table[basic[i] as usize] = 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < extended.len() {
        if extended[i] < 128 {
            table[extended[i] as usize] = 2;
        }
        i += 1;
    }
    table
}

/// Septets `c` takes in the GSM 7-bit alphabet, or `None` outside it.
fn septets_of(c: char) -> Option<u32> {
    let septets = if c.is_ascii() {
        u32::from(ASCII_SEPTETS[c as usize])
    } else if GSM7_BASIC.contains(c) {
        1
    } else if GSM7_EXTENDED.contains(c) {
        2
    } else {
        0
    };
    (septets > 0).then_some(septets)
}

/// The number of parts `text` is billed as.
pub fn sms_parts(text: &str) -> u32 {
    let mut septets = 0u32;
    let mut gsm = true;
    for c in text.chars() {
        match septets_of(c) {
            Some(n) => septets += n,
            None => {
                gsm = false;
                break;
            }
        }
    }
    if gsm {
        parts(septets, 160, 153)
    } else {
        // UCS-2 counts UTF-16 code units: an emoji is two.
        parts(text.encode_utf16().count() as u32, 70, 67)
    }
}

fn parts(units: u32, single: u32, per_part: u32) -> u32 {
    if units <= single {
        1
    } else {
        units.div_ceil(per_part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm7_boundaries() {
        assert_eq!(sms_parts(""), 1);
        assert_eq!(sms_parts(&"a".repeat(160)), 1);
        assert_eq!(sms_parts(&"a".repeat(161)), 2);
        assert_eq!(sms_parts(&"a".repeat(306)), 2);
        assert_eq!(sms_parts(&"a".repeat(307)), 3);
    }

    #[test]
    fn extension_characters_cost_two_septets() {
        assert_eq!(sms_parts(&"€".repeat(80)), 1);
        assert_eq!(sms_parts(&"€".repeat(81)), 2);
    }

    #[test]
    fn ascii_table_agrees_with_the_alphabet() {
        for byte in 0u8..128 {
            let c = char::from(byte);
            let expected = if GSM7_BASIC.contains(c) {
                1
            } else if GSM7_EXTENDED.contains(c) {
                2
            } else {
                0
            };
            assert_eq!(septets_of(c).unwrap_or(0), expected, "{c:?}");
        }
        // A backtick is not in the alphabet: the message goes as UCS-2.
        assert_eq!(sms_parts(&format!("{}`", "a".repeat(70))), 2);
        assert_eq!(sms_parts(&format!("{}[", "a".repeat(158))), 1);
        assert_eq!(sms_parts(&format!("{}[", "a".repeat(159))), 2);
    }

    #[test]
    fn ucs2_boundaries() {
        assert_eq!(sms_parts(&"ж".repeat(70)), 1);
        assert_eq!(sms_parts(&"ж".repeat(71)), 2);
        assert_eq!(sms_parts(&"ж".repeat(134)), 2);
        assert_eq!(sms_parts(&"ж".repeat(135)), 3);
        // One emoji is two UTF-16 units.
        assert_eq!(sms_parts(&format!("{}{}", "a".repeat(68), "👋")), 1);
        assert_eq!(sms_parts(&format!("{}{}", "a".repeat(69), "👋")), 2);
    }
}
