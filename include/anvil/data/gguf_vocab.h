// The tokenizer of a Hugging Face model folder as GGUF metadata (tokenizer.ggml.*, tokenizer.chat_template),
// the keys and values llama.cpp's convert_hf_to_gguf.py writes for a Llama-family model, so that a GGUF
// export (anvil/model/gguf_export.h) carries a tokenizer llama.cpp, gguf-py and transformers rebuild.
//
// It lives in data (the tokenizer layer) rather than model because it reads tokenizer files, and model
// does not depend on data: the caller (bindings, CLI, the quantize recipe) passes the result into
// GgufExportOptions::tokenizer_metadata. Which vocabulary, as LlamaModel.set_vocab picks it:
//   tokenizer.model present -> "llama" (SentencePiece): tokens, scores, token types (_create_vocab_sentencepiece,
//       with tokenizer_config.json's added_tokens_decoder applied), pre "default";
//   else a byte-level BPE tokenizer.json -> "gpt2": tokens (id order, holes as [PADi] UNUSED), token
//       types, merges, and `pre` named by matching the pre-tokenizer's structure against the ones llama.cpp
//       implements and anvil reads back (gpt-2, smollm, llama-bpe, qwen2); llama.cpp's converter hashes
//       the encoding of a test string instead; a pre-tokenizer that matches none is an error, never a
//       guessed name;
//   then SpecialVocab's part: bos/eos/unk/sep/pad/mask ids (tokenizer_config.json's *_token, else
//   config.json's *_token_id), add_bos_token / add_eos_token, the chat template (tokenizer_config.json,
//   else chat_template.jinja / chat_template.json).
#pragma once

#include "anvil/io/gguf.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::data {

/// The tokenizer metadata of `model_dir` for a GGUF file whose vocabulary has `vocab_size` rows
/// (config.json's vocab_size; shorter token lists are padded as the converter pads them). Throws naming
/// the file and the rule when the folder holds no tokenizer or one that cannot be written faithfully.
std::vector<std::pair<std::string, io::GgufValue>> gguf_tokenizer_metadata(const std::string& model_dir,
                                                                           int64_t vocab_size);

}  // namespace anvil::data
