//! CRC-32 (IEEE 802.3), the checksum at the end of every blob.

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0u32;
    let mut slots: &mut [u32] = &mut table;
    while let [slot, rest @ ..] = slots {
        slots = rest;
        let mut c = i;
        let mut k = 0u32;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            // Counters below 256 and 8: no wrap happens.
            k = k.wrapping_add(1);
        }
        *slot = c;
        i = i.wrapping_add(1);
    }
    table
};

/// CRC-32 (IEEE 802.3, the one of zlib, PNG and Python's `zlib.crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        // A u8 index into 256 entries: `get` is always `Some`, and the optimiser knows it
        // (no branch is emitted).
        let entry = CRC_TABLE.get(usize::from(c as u8 ^ b));
        c = entry.copied().unwrap_or(0) ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_zlib_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
    }
}
