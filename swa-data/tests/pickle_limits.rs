//! Hostile pickles are refused by the pre-scan with a typed error, on an ordinary test thread,
//! before serde-pickle could overflow the stack or copy memoised values without bound.

use swa_data::pickle::{self, PickleError, MAX_DEPTH};

/// `\x80\x02` (protocol 2), then `body`, then STOP.
fn stream(body: &[u8]) -> Vec<u8> {
    [&[0x80, 2][..], body, b"."].concat()
}

/// EMPTY_LIST, MARK, `n` small ints, APPENDS: a list of `n` ints in `2n + 3` bytes.
fn int_list(n: usize) -> Vec<u8> {
    let mut body = b"](".to_vec();
    body.extend(std::iter::repeat_n([b'K', 1], n).flatten());
    body.push(b'e');
    body
}

#[test]
fn rejects_deep_nesting_without_overflowing() {
    // 10,000 empty lists, each appended into the one below: 10,000 levels in 20 KB.
    let mut body = vec![b']'; 10_000];
    body.extend(vec![b'a'; 9_999]);
    match pickle::parse(&stream(&body)) {
        Err(PickleError::TooDeep { offset, limit }) => {
            assert_eq!(limit, MAX_DEPTH);
            // Refused at the APPEND that nests one level too deep.
            assert_eq!(offset, 2 + 10_000 + MAX_DEPTH);
        }
        other => panic!("expected TooDeep, got {other:?}"),
    }
}

#[test]
fn nesting_up_to_the_limit_is_read() {
    let mut body = vec![b']'; MAX_DEPTH + 1];
    body.extend(vec![b'a'; MAX_DEPTH]);
    assert!(pickle::parse(&stream(&body)).is_ok());
}

#[test]
fn rejects_nesting_built_through_the_memo() {
    // A chain of lists each appended into the previous one fetched back by GET keeps the stack
    // two entries high while the nesting grows by one per step.
    let mut body = b"]q\x00".to_vec();
    for slot in 1..200u8 {
        body.extend_from_slice(&[b']', b'q', slot, b'a', b'0', b'h', slot]);
    }
    assert!(matches!(
        pickle::parse(&stream(&body)),
        Err(PickleError::MemoRewritten { slot: 1, .. })
    ));
}

#[test]
fn rejects_memo_amplification() {
    // A 1000-element list, then 5000 references to it through BINGET: 5 million copied values
    // from 17 KB.
    let mut body = int_list(1000);
    body.extend_from_slice(b"q\x000]");
    for _ in 0..5000 {
        body.extend_from_slice(b"h\x00a");
    }
    let bytes = stream(&body);
    match pickle::parse(&bytes) {
        Err(error @ PickleError::TooLarge { offset, limit }) => {
            assert_eq!(limit, pickle::MIN_SIZE_BUDGET);
            assert!(offset > 2000 && offset < bytes.len(), "{offset}");
            assert!(error.to_string().contains("byte offset"), "{error}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn rejects_exponential_memo_copies() {
    // Each list holds the previous one twice: 2^60 copies of the first from 300 bytes.
    let mut body = b"]q\x00".to_vec();
    for slot in 1..60u8 {
        body.extend_from_slice(&[b'(', b'h', slot - 1, b'h', slot - 1, b'l', b'q', slot, b'0']);
    }
    body.extend_from_slice(&[b'h', 59]);
    assert!(matches!(
        pickle::parse(&stream(&body)),
        Err(PickleError::TooLarge { .. })
    ));
}

#[test]
fn rejects_dup_amplification() {
    // DUP copies a value that is not memoised: 10,000 copies of a 1000-element list.
    let mut body = int_list(1000);
    body.extend(vec![b'2'; 10_000]);
    assert!(matches!(
        pickle::parse(&stream(&body)),
        Err(PickleError::TooLarge { .. })
    ));
}

#[test]
fn rejects_a_memo_slot_written_twice() {
    // Slot 0 first holds an empty list referred to by another list, then a large one.
    let mut body = b"]q\x00]h\x00a0".to_vec();
    body.extend(int_list(10));
    body.extend_from_slice(b"q\x00");
    assert!(matches!(
        pickle::parse(&stream(&body)),
        Err(PickleError::MemoRewritten { slot: 0, .. })
    ));
}

#[test]
fn unknown_opcode_is_an_error_with_its_offset() {
    match pickle::parse(&stream(b"N\xff")) {
        Err(PickleError::AtOffset { offset: 3, code }) => {
            assert_eq!(code, serde_pickle::ErrorCode::Unsupported('\u{ff}'))
        }
        other => panic!("expected an unsupported opcode, got {other:?}"),
    }
}
