// Byte offsets of tokens in the text they were encoded from: what cross-tokenizer distillation (TRL GOLD's
// extended ULD, train/cross_vocab.h) aligns two tokenizations of one text by.
//
// Why a walk over the tokens' own bytes rather than offsets carried through the encoder: GOLD does not use the
// offsets of the `tokenizers` package as they come either. trl/experimental/utils.py encode_with_byte_offsets takes
// return_offsets_mapping's character spans to bytes and then normalises them (_normalize_byte_offsets,
// _split_repeated_byte_offsets) into consecutive spans of each token's own bytes: a ByteLevel piece covers exactly
// its decoded bytes, a prefix space that the text lacks is not counted, pieces that share one character span
// (byte-level or byte-fallback parts of one character) are split into their bytes. Walking the tokens' bytes
// along the text gives those spans directly, for both tokenizer kinds anvil reads: a byte-level BPE piece is its
// bytes through GPT-2's byte table (an added token its content), a SentencePiece piece its text with "▁" as a
// space (a byte piece <0xNN> the byte).
#pragma once

#include "anvil/data/tokenizer.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::data {

using ByteSpan = std::pair<int64_t, int64_t>;  ///< [start, end) in the text's UTF-8 bytes

/// The bytes a token stands for in text: a byte-level BPE piece decoded through GPT-2's table (a piece with a
/// character outside it, such as an added token's content, as spelled), a SentencePiece piece with "▁" as a space
/// and a byte piece <0xNN> as its byte. Throws std::out_of_range for an id outside the vocabulary.
std::string token_bytes(const Tokenizer& tok, int32_t id);

/// The [start, end) byte span of each token of `ids` in `text` (ids as tok.encode(text, ...) gave them), walking
/// the text: a token whose bytes come next covers them; one that opens with a space the text lacks there (a
/// prefix space: add_prefix_space) covers the rest, and so does SentencePiece's first piece (its dummy prefix,
/// as SentencePiece's own spans count it); a character that byte-fallback pieces spell is split into its bytes,
/// one per piece (SentencePiece gives the whole character to the last); whitespace an added token's
/// lstrip swallowed is skipped; a special token that is not in the text (bos, eos added by the post-processor) is
/// an empty span at the current byte. Any other token is an error (std::runtime_error naming `what`, the token,
/// its id and the byte): its tokenizer rewrote the text (a normalizer), and the spans would be guesses.
std::vector<ByteSpan> token_byte_offsets(const Tokenizer& tok, const std::string& text,
                                         const std::vector<int32_t>& ids, const std::string& what = "text");

/// tok.encode(text, add_special_tokens) with each token's byte span (token_byte_offsets): transformers'
/// return_offsets_mapping in bytes, as GOLD normalises it.
struct EncodingWithOffsets {
  std::vector<int32_t> ids;
  std::vector<ByteSpan> offsets;
};
EncodingWithOffsets encode_with_offsets(const Tokenizer& tok, const std::string& text, bool add_special_tokens = true,
                                        const std::string& what = "text");

}  // namespace anvil::data
