//! A client socket that may negotiate permessage-deflate, for scenarios that measure it
//! (`bigroom --deflate`): fastwebsockets refuses a frame with RSV1, so after its handshake the
//! frames are read here straight off the upgraded stream and compressed ones are inflated with the
//! gateway's own [`gateway::deflate::inflate`]. Server frames only (unmasked, never fragmented by
//! the gateway); what it sends is one masked text frame at a time.

use anyhow::bail;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

/// The largest message this client inflates (a 10,000-member `presence_state` is about 1 MB).
const MAX_MESSAGE: usize = 64 << 20;

pub struct ZWs {
    io: BufReader<TokioIo<hyper::upgrade::Upgraded>>,
    /// The gateway accepted the offer.
    pub deflate: bool,
}

/// One server message: its opcode, its payload (inflated when it came compressed) and the
/// payload's size on the wire.
pub struct Msg {
    pub opcode: u8,
    pub payload: Vec<u8>,
    pub wire: usize,
}

pub const TEXT: u8 = 1;
pub const CLOSE: u8 = 8;

/// Opens a socket to `addr`, signed in with `token` if any, offering permessage-deflate when
/// `offer`.
pub async fn open(addr: &str, token: Option<&str>, offer: bool) -> anyhow::Result<ZWs> {
    let offer = offer.then_some("permessage-deflate; client_max_window_bits");
    let (ws, resp) = crate::client::handshake(addr, token, offer).await?;
    let deflate = resp
        .headers()
        .get("sec-websocket-extensions")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("permessage-deflate"));
    Ok(ZWs {
        io: BufReader::with_capacity(64 * 1024, ws.into_inner()),
        deflate,
    })
}

impl ZWs {
    /// Sends one text message (masked, uncompressed: RSV1 is per message).
    pub async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        let data = text.as_bytes();
        let mask: [u8; 4] = rand::random();
        let mut f = vec![0x81u8];
        match data.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.io.write_all(&f).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next server message.
    pub async fn read(&mut self) -> anyhow::Result<Msg> {
        let mut h = [0u8; 2];
        self.io.read_exact(&mut h).await?;
        if h[0] & 0x80 == 0 {
            bail!("a fragmented server frame (the gateway sends none)");
        }
        let len = match h[1] & 0x7f {
            126 => usize::from(self.io.read_u16().await?),
            127 => self.io.read_u64().await? as usize,
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        self.io.read_exact(&mut payload).await?;
        let payload = if h[0] & 0x40 != 0 {
            if !self.deflate {
                bail!("RSV1 without permessage-deflate negotiated");
            }
            gateway::deflate::inflate(&payload, MAX_MESSAGE)
                .map_err(|e| anyhow::anyhow!("inflate: {e:?}"))?
        } else {
            payload
        };
        Ok(Msg {
            opcode: h[0] & 0x0f,
            payload,
            wire: len,
        })
    }
}
