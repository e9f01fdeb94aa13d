//! The Retrieval service's codec: prost's, except that a message that does not decode (bad wire
//! format, a string field that is not UTF-8) is the sender's error. prost's codec answers
//! INTERNAL; this one answers INVALID_ARGUMENT and marks the response with the RPC's name in
//! [`UNDECODABLE`], so that the server's outer layer counts it in `blipdex_requests_total`
//! (no handler ever sees such a request) and strips the mark.

use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Response metadata naming the RPC whose request did not decode; never leaves the server.
pub(crate) const UNDECODABLE: &str = "x-blipdex-undecodable";

pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder())
    }
}

pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|e| {
            let message = message_name::<U>();
            let mut status = Status::invalid_argument(format!(
                "the message is not a valid blipdex.v1.{message} ({}); send a well-formed \
                 protobuf (strings must be UTF-8)",
                e.message()
            ));
            let rpc = message.strip_suffix("Request").unwrap_or(message);
            if let Ok(v) = rpc.parse() {
                status.metadata_mut().insert(UNDECODABLE, v);
            }
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// `SearchTextRequest` for `blipdex_server::pb::SearchTextRequest`.
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}
