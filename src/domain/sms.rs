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

/// The number of parts `text` is billed as.
pub fn sms_parts(text: &str) -> u32 {
    let mut septets = 0u32;
    let mut gsm = true;
    for c in text.chars() {
        if GSM7_BASIC.contains(c) {
            septets += 1;
        } else if GSM7_EXTENDED.contains(c) {
            septets += 2;
        } else {
            gsm = false;
            break;
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
