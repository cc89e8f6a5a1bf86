//! Redis Cluster hash slots: which of the 16384 slots a key belongs to.
//!
//! Invariant kept here: [`key_slot`] computes exactly what Redis Cluster computes
//! (CRC16/XMODEM of the `{hash tag}` part when there is a non-empty one, else of the whole
//! key, modulo 16384), so a key layout that works on the embedded backend works on a real
//! cluster and vice versa.

/// Number of hash slots in Redis Cluster.
pub const NUM_SLOTS: usize = 16384;

/// CRC16/XMODEM (polynomial 0x1021, init 0, no reflection) lookup table, built at compile time.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC16/XMODEM of `data`, the checksum Redis Cluster uses for key slots.
pub fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[usize::from(((crc >> 8) as u8) ^ b)]
    })
}

/// The Redis Cluster hash slot of `key`: only the part between the first `{` and the next
/// `}` is hashed when that part is non-empty (a "hash tag").
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & (NUM_SLOTS as u16 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_check_value() {
        // The standard CRC16/XMODEM check value.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn known_redis_slots() {
        // Values as printed by `CLUSTER KEYSLOT` on a real cluster.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b""), 0);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    }

    #[test]
    fn hash_tag_rules() {
        // Empty tag: the whole key is hashed.
        assert_eq!(key_slot(b"{}foo"), crc16(b"{}foo") & 16383);
        // Only the first tag counts.
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        // An opening brace without a closing one: the whole key.
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") & 16383);
        // The tag ends at the first closing brace after the opening one.
        assert_eq!(key_slot(b"{{bar}}"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"{b:1}:stock"), key_slot(b"{b:1}:meta"));
    }
}
