//! When bytes reached a benchmark client's socket, as the kernel saw it.
//!
//! The benchmarks' clients share the server's two cores, and run as batch
//! threads so that an answer arriving does not preempt the server (see
//! [`super::yield_to_the_server_on_wake_up`]). The price is that an answer
//! can sit in the client's socket until the scheduler next gives the client
//! thread a core: on this kernel (250 Hz), up to a 4 ms tick. Timed when the
//! client thread reads it, the answer's latency counts that wait, which a
//! client on a machine of its own never has; a page's latencies bunched at
//! 4 and 8 ms.
//!
//! With `SO_TIMESTAMPNS` on, the kernel stamps each packet as it reaches the
//! socket (on loopback, when the server's `send` hands it over), and
//! `recvmsg` tells the stamp of the last packet a read took: when the bytes
//! read were all there. The benchmarks time with it, and show the time the
//! client thread read the bytes beside it.

use std::io;

/// Unix time in milliseconds, now.
pub(super) fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64() * 1000.0)
}

/// When bytes reached the client's socket, and when its thread read them
/// (Unix ms): what a benchmark times an answer or a frame with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    pub arrived: f64,
    pub read: f64,
}

impl Times {
    /// Bytes read just now, with the kernel's stamp when it gave one
    /// (else they are timed as they are read).
    pub fn read_now(stamp: Option<f64>) -> Self {
        let read = now_ms();
        Self {
            arrived: stamp.unwrap_or(read),
            read,
        }
    }
}

/// Asks the kernel to stamp what reaches `socket`. When no socket of the
/// machine asked before, the kernel starts stamping a moment later; what
/// arrives meanwhile reads unstamped, and is timed when it is read.
#[cfg(target_os = "linux")]
pub(super) fn stamp_arrivals(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid c_int for the call's duration.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads what `socket` has into `buffer`: how many bytes, and when the last
/// of them reached the socket (Unix ms), when the kernel stamped them.
#[cfg(target_os = "linux")]
pub(super) fn read_stamped(
    socket: &impl std::os::fd::AsRawFd,
    buffer: &mut [u8],
) -> io::Result<(usize, Option<f64>)> {
    let mut part = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // Room for one control message holding a `timespec`, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero `msghdr` is valid: no name, no parts, no control.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut part;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `message` points at `part` (into `buffer`) and `control`,
    // which outlive the call, with their true lengths.
    let read = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, 0) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control
    // messages into `control`; the CMSG_* helpers walk them within it, and a
    // timestamp's data is a `timespec`, read unaligned to be safe.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET
                && (*header).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let at: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast());
                stamp = Some(at.tv_sec as f64 * 1000.0 + at.tv_nsec as f64 / 1e6);
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    Ok((read as usize, stamp))
}

/// Elsewhere, no stamps: arrivals are timed when they are read.
#[cfg(not(target_os = "linux"))]
pub(super) fn stamp_arrivals(_socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(super) fn read_stamped(
    socket: &impl std::os::fd::AsRawFd,
    buffer: &mut [u8],
) -> io::Result<(usize, Option<f64>)> {
    // SAFETY: `buffer` is valid for writes of its length.
    let read = unsafe { libc::read(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((read as usize, None))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_tells_when_its_bytes_arrived_not_when_they_were_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reader = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        stamp_arrivals(&reader).unwrap();
        let (mut writer, _) = listener.accept().unwrap();
        // The kernel turns stamping on for the first stamping socket a
        // moment later (a deferred static key), so wait for a stamped byte.
        let mut byte = [0u8; 1];
        let stamping = (0..200).any(|_| {
            writer.write_all(b"?").unwrap();
            let (_, stamp) = read_stamped(&reader, &mut byte).unwrap();
            stamp.is_some() || {
                std::thread::sleep(std::time::Duration::from_millis(5));
                false
            }
        });
        assert!(stamping, "no read was stamped within a second");
        let sent = now_ms();
        writer.write_all(&[7u8; 30_000]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut buffer = vec![0u8; 64 * 1024];
        let mut got = 0;
        let mut last_stamp = None;
        while got < 30_000 {
            let (n, stamp) = read_stamped(&reader, &mut buffer).unwrap();
            assert!(n > 0, "closed early");
            got += n;
            last_stamp = stamp.or(last_stamp);
        }
        let read = now_ms();
        let arrived = last_stamp.expect("the kernel stamped the bytes");
        assert!(arrived >= sent - 1.0, "stamped {arrived}, sent at {sent}");
        assert!(
            read - arrived >= 90.0,
            "read {:.1} ms after arriving; the reader slept 100 ms",
            read - arrived
        );
    }

    #[test]
    fn an_unstamped_socket_reads_without_a_stamp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reader = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut writer, _) = listener.accept().unwrap();
        writer.write_all(b"hello").unwrap();
        let mut buffer = [0u8; 16];
        let (n, stamp) = read_stamped(&reader, &mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"hello");
        assert_eq!(stamp, None);
    }
}
