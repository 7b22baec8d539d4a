// Tests of the safetensors reader and writer, checkpoint directories and model-path resolution:
// bit-exact round trips of every dtype the format defines (random bytes, so every bit pattern of the
// float types is exercised), the edge shapes (scalars, zero-size tensors, no tensors), the copy path
// for unaligned data, sharding as transformers writes it, a table of malformed files each of which must
// be refused with a message that names the rule, and a deterministic mutation loop over a valid file
// (only clean errors, never a crash). The Python oracle tests (tests/python/test_safetensors_io.py)
// check the same files against the `safetensors` package itself.
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

namespace {

using anvil::test::bit_equal;
using anvil::test::expect_error;

// POSIX, not std::filesystem: libtorch.so exports broken copies of std::filesystem's functions.
bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.push_back(e->d_name);
    ::closedir(d);
  }
  return out;
}

void make_dirs(const std::string& path) {
  for (size_t i = 1; i <= path.size(); ++i)
    if (i == path.size() || path[i] == '/') ::mkdir(path.substr(0, i).c_str(), 0777);
}

std::string base_name(const std::string& path) { return path.substr(path.find_last_of('/') + 1); }

// A fresh directory under $TMPDIR (or /tmp), removed with its contents when the test ends.
class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/anvil_io_test_XXXXXX";
    EXPECT_NE(::mkdtemp(templ.data()), nullptr);
    path_ = templ;
  }
  ~TempDir() {
    ::nftw(path_.c_str(), [](const char* p, const struct stat*, int, FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A raw file: 8-byte little-endian length, the header text as given, then `data`.
std::string make_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

anvil::io::SafetensorsHeader parse(const std::string& bytes) {
  return anvil::io::parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "test");
}

// Random bytes reinterpreted as `dtype` (bool gets 0/1: other bytes are not valid bools).
at::Tensor random_tensor(at::ScalarType dtype, at::IntArrayRef shape) {
  int64_t numel = 1;
  for (auto d : shape) numel *= d;
  if (dtype == at::kBool) return at::randint(0, 2, shape, at::kByte).to(at::kBool);
  const int64_t elem = c10::elementSize(dtype);
  return at::randint(0, 256, {numel * elem}, at::kByte).view(dtype).reshape(shape);
}

struct DtypeCase {
  at::ScalarType dtype;
  const char* name;
};

const std::vector<DtypeCase> kAllDtypes = {
    {at::kBool, "BOOL"},           {at::kByte, "U8"},
    {at::kChar, "I8"},             {at::kFloat8_e5m2, "F8_E5M2"},
    {at::kFloat8_e4m3fn, "F8_E4M3"}, {at::kFloat8_e8m0fnu, "F8_E8M0"},
    {at::kFloat8_e4m3fnuz, "F8_E4M3FNUZ"}, {at::kFloat8_e5m2fnuz, "F8_E5M2FNUZ"},
    {at::kShort, "I16"},           {at::kUInt16, "U16"},
    {at::kHalf, "F16"},            {at::kBFloat16, "BF16"},
    {at::kInt, "I32"},             {at::kUInt32, "U32"},
    {at::kFloat, "F32"},           {at::kComplexFloat, "C64"},
    {at::kDouble, "F64"},          {at::kLong, "I64"},
    {at::kUInt64, "U64"},
};

TEST(Safetensors, RoundTripsEveryDtypeBitExactAndZeroCopy) {
  TempDir dir;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& c : kAllDtypes) tensors.emplace_back(std::string("t.") + c.name, random_tensor(c.dtype, {3, 5, 7}));
  const std::string path = dir.file("all.safetensors");
  anvil::io::save_safetensors(path, tensors, {{"format", "pt"}, {"note", "héllo \"quoted\""}});

  anvil::io::SafetensorsFile f(path);
  ASSERT_EQ(f.entries().size(), kAllDtypes.size());
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "héllo \"quoted\"");
  EXPECT_EQ(f.header_bytes() % 8, 0u) << "header must be padded to a multiple of 8";
  for (size_t i = 0; i < kAllDtypes.size(); ++i) {
    const auto& [name, want] = tensors[i];
    const auto& e = f.entry(name);
    EXPECT_EQ(e.dtype_name, kAllDtypes[i].name);
    EXPECT_EQ(e.dtype, kAllDtypes[i].dtype);
    EXPECT_EQ(anvil::io::safetensors_dtype_name(want.scalar_type()), kAllDtypes[i].name);
    EXPECT_EQ(anvil::io::safetensors_dtype_size(kAllDtypes[i].name), want.element_size());
    const at::Tensor got = f.tensor(name);
    EXPECT_TRUE(bit_equal(got, want)) << name;
    EXPECT_TRUE(f.is_zero_copy(name)) << name << ": the writer's order keeps every tensor aligned";
  }
  // Entries come in data-offset order, contiguous from 0, widest dtypes first as the reference writes.
  uint64_t expect = 0;
  for (const auto& e : f.entries()) {
    EXPECT_EQ(e.begin, expect) << e.name;
    expect = e.end;
  }
  EXPECT_EQ(f.entries().front().dtype_name, "U64");
  EXPECT_EQ(f.entries().back().dtype_name, "BOOL");
  EXPECT_EQ(f.file_bytes(), file_size(path));
}

TEST(Safetensors, ScalarsZeroSizeAndEmptyFiles) {
  TempDir dir;
  const auto scalar = at::tensor(2.5, at::kDouble).reshape({});
  const auto empty = at::empty({0, 4}, at::kBFloat16);
  const auto empty2 = at::empty({3, 0}, at::kFloat);
  const std::string path = dir.file("edge.safetensors");
  anvil::io::save_safetensors(path, {{"scalar", scalar}, {"empty", empty}, {"empty2", empty2}});
  anvil::io::SafetensorsFile f(path);
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.tensor("scalar").dim(), 0);
  EXPECT_EQ(f.tensor("scalar").item<double>(), 2.5);
  EXPECT_EQ(f.tensor("empty").sizes(), at::IntArrayRef({0, 4}));
  EXPECT_EQ(f.tensor("empty").scalar_type(), at::kBFloat16);
  EXPECT_EQ(f.tensor("empty2").sizes(), at::IntArrayRef({3, 0}));

  // No tensors, no metadata: exactly the reference writer's 16 bytes.
  const std::string none = dir.file("none.safetensors");
  anvil::io::save_safetensors(none, {});
  EXPECT_EQ(read_bytes(none), make_file("{}      ", ""));
  anvil::io::SafetensorsFile g(none);
  EXPECT_TRUE(g.entries().empty());
  anvil::io::Checkpoint c(none);
  EXPECT_TRUE(c.keys().empty());

  // Only metadata.
  const std::string meta = dir.file("meta.safetensors");
  anvil::io::save_safetensors(meta, {}, {{"a", "1"}, {"b", ""}});
  anvil::io::SafetensorsFile h(meta);
  EXPECT_EQ(h.metadata().size(), 2u);
  EXPECT_EQ(h.metadata().at("b"), "");
}

TEST(Safetensors, WritesAnyDeviceAndStrides) {
  TempDir dir;
  const auto base = at::randn({6, 8});
  const auto transposed = base.t();            // (8, 6) non-contiguous
  const auto sliced = base.slice(1, 1, 7, 2);  // (6, 3) strided
  const std::string path = dir.file("strided.safetensors");
  anvil::io::save_safetensors(path, {{"t", transposed}, {"s", sliced}});
  anvil::io::SafetensorsFile f(path);
  EXPECT_TRUE(at::equal(f.tensor("t"), transposed));
  EXPECT_TRUE(at::equal(f.tensor("s"), sliced));
}

TEST(Safetensors, UnalignedDataIsCopied) {
  TempDir dir;
  // A U8 byte first puts the F32 tensor at data offset 1: legal, but not aligned for float.
  const std::vector<float> values = {1.5f, -2.0f, 3.25f};
  std::string data(1, '\x7f');
  data.append(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  std::string header = R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const std::string path = dir.file("unaligned.safetensors");
  write_bytes(path, make_file(header, data));

  anvil::io::SafetensorsFile f(path);
  EXPECT_FALSE(f.is_zero_copy("f"));
  EXPECT_TRUE(f.is_zero_copy("b"));
  const at::Tensor t = f.tensor("f");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4, 0u);
  EXPECT_TRUE(at::equal(t, at::tensor(values)));
  EXPECT_EQ(f.tensor("b").item<uint8_t>(), 0x7f);
}

TEST(Safetensors, ZeroCopyTensorsOutliveTheFileAndNeverWriteIt) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  const auto w = at::randn({64, 64});
  anvil::io::save_safetensors(path, {{"w", w}});
  const std::string before = read_bytes(path);
  at::Tensor t;
  {
    anvil::io::SafetensorsFile f(path);
    t = f.tensor("w");
  }
  EXPECT_TRUE(at::equal(t, w));  // the mapping is still alive
  t.mul_(2);                     // copy-on-write: the process sees the change ...
  EXPECT_TRUE(at::equal(t, w * 2));
  EXPECT_EQ(read_bytes(path), before);  // ... the file does not
}

TEST(Safetensors, MissingKeyNamesKeyAndFile) {
  TempDir dir;
  const std::string path = dir.file("k.safetensors");
  anvil::io::save_safetensors(path, {{"present", at::ones({2})}});
  anvil::io::SafetensorsFile f(path);
  EXPECT_TRUE(f.contains("present"));
  EXPECT_FALSE(f.contains("absent"));
  expect_error([&] { f.entry("absent"); }, {"absent", path});
  expect_error([&] { f.tensor("absent"); }, {"absent", path});
  anvil::io::Checkpoint c(path);
  expect_error([&] { c.tensor("absent"); }, {"absent", path});
}

// ---- malformed files: each must be refused with a message naming the rule -------------------------

struct BadCase {
  const char* what;
  std::string bytes;
  std::vector<std::string> words;
};

std::string good_entry(const char* name, uint64_t b, uint64_t e) {
  return std::string("\"") + name + R"(":{"dtype":"U8","shape":[)" + std::to_string(e - b) +
         R"(],"data_offsets":[)" + std::to_string(b) + "," + std::to_string(e) + "]}";
}

std::vector<BadCase> bad_cases() {
  auto file = [](const std::string& header, size_t data_bytes) { return make_file(header, std::string(data_bytes, 'x')); };
  std::string huge_len(8, '\0');
  const uint64_t big = anvil::io::kMaxHeaderBytes + 1;
  for (int i = 0; i < 8; ++i) huge_len[i] = static_cast<char>((big >> (8 * i)) & 0xff);
  std::string past_end(8, '\0');
  past_end[0] = 100;
  std::string max_len(8, '\xff');
  return {
      {"shorter than 8 bytes", "abc", {"shorter than the 8-byte header length"}},
      {"empty file", "", {"shorter than the 8-byte header length"}},
      {"header length above the bound", huge_len + "{}", {"exceeds the bound of 100000000"}},
      {"header length of 2^64-1", max_len + "{}", {"exceeds the bound"}},
      {"header length past the end", past_end + "{}", {"runs past the end of the file"}},
      {"header not an object", file("[1,2]   ", 0), {"starting with '{'"}},
      {"header with leading space", file(" {}     ", 0), {"starting with '{'"}},
      {"invalid JSON", file("{\"a\":}  ", 0), {"not valid UTF-8 JSON"}},
      {"trailing garbage after the JSON", file("{}x     ", 0), {"not valid UTF-8 JSON"}},
      {"invalid UTF-8 in a key", file("{\"\xff\":1}", 0), {"not valid UTF-8 JSON"}},
      {"NUL padding instead of spaces", file(std::string("{}\0\0\0\0\0\0", 8), 0), {"NUL byte"}},
      {"NUL then garbage", file(std::string("{}\0xyz   ", 8), 0), {"NUL byte"}},
      {"duplicate tensor key", file("{" + good_entry("a", 0, 1) + "," + good_entry("a", 1, 2) + "}", 2),
       {"duplicate key 'a'"}},
      {"duplicate metadata key", file(R"({"__metadata__":{"k":"1","k":"2"}})", 0), {"duplicate key 'k'"}},
      {"nesting too deep", file(R"({"a":{"shape":[[1]]}})", 0), {"nests deeper"}},
      {"metadata not an object", file(R"({"__metadata__":"pt"})", 0), {"__metadata__ must be an object"}},
      {"metadata value not a string", file(R"({"__metadata__":{"n":1}})", 0), {"__metadata__ value of 'n'"}},
      {"tensor not an object", file(R"({"a":[1]})", 0), {"tensor 'a' must be an object"}},
      {"unknown dtype", file(R"({"a":{"dtype":"F17","shape":[1],"data_offsets":[0,1]}})", 1), {"unknown dtype 'F17'"}},
      {"sub-byte dtype", file(R"({"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", 1), {"sub-byte"}},
      {"dtype not a string", file(R"({"a":{"dtype":1,"shape":[1],"data_offsets":[0,1]}})", 1), {"dtype must be a string"}},
      {"missing shape", file(R"({"a":{"dtype":"U8","data_offsets":[0,1]}})", 1), {"lacks the field 'shape'"}},
      {"missing data_offsets", file(R"({"a":{"dtype":"U8","shape":[1]}})", 1), {"lacks the field 'data_offsets'"}},
      {"unknown field", file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}})", 1),
       {"unknown field 'x'"}},
      {"shape not an array", file(R"({"a":{"dtype":"U8","shape":1,"data_offsets":[0,1]}})", 1), {"shape must be an array"}},
      {"negative shape", file(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1), {"non-negative integers"}},
      {"fractional shape", file(R"({"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", 1), {"non-negative integers"}},
      {"shape above int64", file(R"({"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]}})", 1),
       {"overflows int64"}},
      {"element count overflow", file(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}})", 1),
       {"overflows 64 bits"}},
      {"byte size overflow", file(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,1]}})", 1),
       {"overflows"}},
      {"offsets not a pair", file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 1),
       {"data_offsets must be an array [begin, end]"}},
      {"negative offset", file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1), {"non-negative integers"}},
      {"end before begin", file(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}})", 1), {"is before begin"}},
      {"shape x dtype disagrees with offsets", file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4),
       {"is 8 bytes but data_offsets [0, 4] span 4"}},
      {"first tensor not at 0", file("{" + good_entry("a", 1, 2) + "}", 2), {"not contiguous", "(gap)"}},
      {"gap between tensors", file("{" + good_entry("a", 0, 1) + "," + good_entry("b", 2, 3) + "}", 3),
       {"not contiguous", "'b' begins at 2", "(gap)"}},
      {"overlapping tensors", file("{" + good_entry("a", 0, 2) + "," + good_entry("b", 1, 3) + "}", 3),
       {"not contiguous", "(overlap)"}},
      {"offsets past the end of the file", file("{" + good_entry("a", 0, 10) + "}", 4), {"offsets out of range"}},
      {"trailing bytes after the data", file("{" + good_entry("a", 0, 1) + "}", 5), {"trailing bytes"}},
      {"huge offsets", file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})", 0),
       {"span"}},
  };
}

TEST(Safetensors, MalformedFilesAreRefusedNamingTheRule) {
  TempDir dir;
  int i = 0;
  for (const auto& c : bad_cases()) {
    SCOPED_TRACE(c.what);
    expect_error([&] { parse(c.bytes); }, c.words);
    // Through a file too: the message names it.
    const std::string path = dir.file("bad" + std::to_string(i++) + ".safetensors");
    write_bytes(path, c.bytes);
    auto words = c.words;
    words.push_back(path);
    expect_error([&] { anvil::io::SafetensorsFile f(path); }, words);
  }
}

TEST(Safetensors, HeaderKeyOrderDoesNotMatter) {
  // Offsets, not the header's key order, order the data (old writers sorted by name).
  const std::string bytes = make_file("{" + good_entry("z", 0, 2) + "," + good_entry("a", 2, 3) + "}   ", "xyz");
  const auto h = parse(bytes);
  ASSERT_EQ(h.entries.size(), 2u);
  EXPECT_EQ(h.entries[0].name, "z");
  EXPECT_EQ(h.entries[1].name, "a");
}

// ---- mutations of a valid file: clean errors only -------------------------------------------------

TEST(Safetensors, MutationsGiveCleanErrorsOnly) {
  TempDir dir;
  const std::string path = dir.file("seed.safetensors");
  anvil::io::save_safetensors(path,
                              {{"a", random_tensor(at::kBFloat16, {4, 3})},
                               {"b", random_tensor(at::kFloat8_e4m3fn, {5})},
                               {"c", random_tensor(at::kLong, {2})},
                               {"d", at::empty({0}, at::kFloat)},
                               {"e", random_tensor(at::kBool, {})}},
                              {{"format", "pt"}});
  const std::string seed = read_bytes(path);
  std::mt19937 rng(1234);
  const std::string interesting = "{}[]\":,0123456789-. eE\\\xff\x00";
  int accepted = 0, refused = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::string m = seed;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      const size_t pos = m.empty() ? 0 : rng() % m.size();
      switch (rng() % 6) {
        case 0:
          if (!m.empty()) m[pos] = static_cast<char>(rng());
          break;
        case 1:
          if (!m.empty()) m[pos] = interesting[rng() % interesting.size()];
          break;
        case 2:
          m.insert(pos, 1, interesting[rng() % interesting.size()]);
          break;
        case 3:
          if (!m.empty()) m.erase(pos, 1 + rng() % 4);
          break;
        case 4:
          m.resize(pos);  // truncate
          break;
        case 5:  // the length field: small changes keep it plausible
          if (m.size() >= 8) m[rng() % 2] = static_cast<char>(m[0] + static_cast<int>(rng() % 17) - 8);
          break;
      }
    }
    try {
      const auto h = parse(m);
      ++accepted;
      // Whatever was accepted is self-consistent and inside the buffer.
      uint64_t end = 0;
      for (const auto& e : h.entries) {
        ASSERT_EQ(e.begin, end);
        end = e.end;
      }
      ASSERT_EQ(8 + h.header_bytes + h.data_bytes, m.size());
    } catch (const c10::Error& e) {
      ++refused;
      ASSERT_NE(std::string(e.what_without_backtrace()).find("safetensors: test"), std::string::npos)
          << e.what_without_backtrace();
    }
    if (iter % 20 == 0) {  // through the file reader as well (mmap path)
      write_bytes(path, m);
      try {
        anvil::io::SafetensorsFile f(path);
        for (const auto& e : f.entries()) (void)f.tensor(e.name).sum();
      } catch (const c10::Error&) {
      }
    }
  }
  EXPECT_GT(refused, 3000);
  std::cout << "mutations: " << accepted << " accepted, " << refused << " refused\n";
}

// ---- checkpoints ----------------------------------------------------------------------------------

std::vector<std::pair<std::string, at::Tensor>> small_model() {
  std::vector<std::pair<std::string, at::Tensor>> t;
  t.emplace_back("model.embed_tokens.weight", random_tensor(at::kBFloat16, {32, 16}));   // 1024 bytes
  for (int l = 0; l < 3; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.emplace_back(p + "self_attn.q_proj.weight", random_tensor(at::kBFloat16, {16, 16}));  // 512
    t.emplace_back(p + "mlp.up_proj.weight", random_tensor(at::kBFloat16, {24, 16}));       // 768
    t.emplace_back(p + "input_layernorm.weight", random_tensor(at::kFloat, {16}));          // 64
  }
  t.emplace_back("lm_head.weight", random_tensor(at::kBFloat16, {64, 16}));  // 2048: larger than a shard
  return t;
}

TEST(Checkpoint, ShardsLikeTransformersAndLoadsBack) {
  TempDir dir;
  const auto tensors = small_model();
  anvil::io::save_checkpoint(dir.path(), tensors, 1500);
  // embed (1024) | q(512)+up(768)+ln(64)=1344 | ... ; lm_head (2048 > 1500) alone.
  EXPECT_FALSE(exists(dir.file("model.safetensors")));
  ASSERT_TRUE(exists(dir.file("model.safetensors.index.json")));
  int shards = 0;
  for (const auto& name : list_dir(dir.path()))
    if (name.size() > 12 && name.substr(name.size() - 12) == ".safetensors") ++shards;
  EXPECT_EQ(shards, 5);
  EXPECT_TRUE(exists(dir.file("model-00001-of-00005.safetensors")));

  anvil::io::Checkpoint c(dir.path());
  EXPECT_EQ(c.files().size(), 5u);
  uint64_t total = 0;
  for (const auto& [name, t] : tensors) total += t.nbytes();
  EXPECT_EQ(c.metadata().at("total_size"), std::to_string(total));
  auto keys = c.keys();
  EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end()));
  EXPECT_EQ(keys.size(), tensors.size());
  const auto all = c.load_all();
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(bit_equal(c.tensor(name), t)) << name;
    EXPECT_TRUE(bit_equal(all.at(name), t)) << name;
    if (t.numel())  // CPU load_all is zero-copy: the tensor's data is the mapping's
      EXPECT_EQ(all.at(name).const_data_ptr(), static_cast<const void*>(c.file_of(name).data(c.entry(name)))) << name;
    EXPECT_EQ(c.file_of(name).metadata().at("format"), "pt");
  }
  // The embedding fills shard 1 alone (it plus the next layer would overflow 1500).
  EXPECT_EQ(base_name(c.file_of("model.embed_tokens.weight").path()), "model-00001-of-00005.safetensors");

  // A second save that fits one file replaces the shards and the index.
  anvil::io::save_checkpoint(dir.path(), tensors);
  EXPECT_TRUE(exists(dir.file("model.safetensors")));
  EXPECT_FALSE(exists(dir.file("model.safetensors.index.json")));
  EXPECT_FALSE(exists(dir.file("model-00001-of-00005.safetensors")));
  anvil::io::Checkpoint single(dir.path());
  EXPECT_EQ(single.files().size(), 1u);
  for (const auto& [name, t] : tensors) EXPECT_TRUE(bit_equal(single.tensor(name), t)) << name;
}

TEST(Checkpoint, BadDirectoriesAndIndexesAreRefused) {
  TempDir dir;
  const std::string d = dir.path();
  expect_error([&] { anvil::io::Checkpoint c(dir.file("nope")); }, {"no such file or directory"});
  expect_error([&] { anvil::io::Checkpoint c(d); }, {"holds neither", "model.safetensors.index.json"});

  anvil::io::save_safetensors(dir.file("model-00001-of-00001.safetensors"), {{"a", at::ones({2})}});
  const auto index = dir.file("model.safetensors.index.json");
  auto try_index = [&](const std::string& text, const std::vector<std::string>& words) {
    write_bytes(index, text);
    expect_error([&] { anvil::io::Checkpoint c(d); }, words);
  };
  try_index(R"({"weight_map":{"a":"../model-00001-of-00001.safetensors"}})", {"plain file name"});
  try_index(R"({"weight_map":{"a":"/etc/passwd"}})", {"plain file name"});
  try_index(R"({"weight_map":{"a":"missing.safetensors"}})", {"missing.safetensors", "does not exist"});
  try_index(R"({"weight_map":{"b":"model-00001-of-00001.safetensors"}})", {"'b'", "does not hold it"});
  try_index(R"({"weight_map":{"a":1}})", {"weight_map['a'] must be a file name"});
  try_index(R"({"metadata":{}})", {"lacks the object 'weight_map'"});
  try_index(R"({"weight_map":{"a":"x","a":"y"}})", {"duplicate key 'a'"});
  try_index(R"({"weight_map":)", {"not valid JSON"});
  try_index(R"({"metadata":[],"weight_map":{}})", {"'metadata' must be an object"});
  // A valid index loads.
  write_bytes(index, R"({"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00001.safetensors"}})");
  anvil::io::Checkpoint c(d);
  EXPECT_EQ(c.keys(), std::vector<std::string>{"a"});
  EXPECT_EQ(c.metadata().at("total_size"), "8");
}

TEST(Checkpoint, FailedWritesLeaveNoPartialFile) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  anvil::io::save_safetensors(path, {{"old", at::ones({3})}});
  const std::string before = read_bytes(path);
  auto no_temp_files = [&] {
    for (const auto& name : list_dir(dir.path())) EXPECT_EQ(name.find(".tmp."), std::string::npos) << name;
  };
  // Refused before writing: the old file is intact.
  expect_error([&] { anvil::io::save_safetensors(path, {{"x", at::ones({2}, at::kComplexDouble)}}); },
               {"no safetensors equivalent"});
  expect_error([&] { anvil::io::save_safetensors(path, {{"x", at::ones({2})}, {"x", at::ones({2})}}); },
               {"duplicate tensor name 'x'"});
  expect_error([&] { anvil::io::save_safetensors(path, {{"__metadata__", at::ones({2})}}); }, {"reserved"});
  expect_error([&] { anvil::io::save_safetensors(path, {{"bad\xff", at::ones({2})}}); }, {"UTF-8"});
  expect_error([&] { anvil::io::save_safetensors(path, {{"m", at::ones({2}, at::TensorOptions().device(at::kMeta))}}); },
               {"'m'", "meta device"});
  EXPECT_EQ(read_bytes(path), before);
  // Failing at the rename (the target is a directory): the temporary file is removed.
  make_dirs(dir.file("adir"));
  expect_error([&] { anvil::io::save_safetensors(dir.file("adir"), {{"x", at::ones({2})}}); }, {"adir", "rename"});
  // A directory that does not exist.
  expect_error([&] { anvil::io::save_safetensors(dir.file("no/such/dir.safetensors"), {{"x", at::ones({2})}}); },
               {"no/such/dir.safetensors"});
  no_temp_files();
  EXPECT_EQ(read_bytes(path), before);
}

// ---- model paths ----------------------------------------------------------------------------------

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* v = std::getenv(name)) old_ = v, had_ = true;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_)
      ::setenv(name_, old_.c_str(), 1);
    else
      ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(ModelPath, ResolvesPathsAndHubIdsInTheLocalCache) {
  TempDir dir;
  const std::string repo = dir.file("hub/models--org--tiny-model");
  make_dirs(repo + "/refs");
  make_dirs(repo + "/snapshots/abc123");
  make_dirs(repo + "/snapshots/def456");
  write_bytes(repo + "/refs/main", "abc123\n");
  ScopedEnv cache("HF_HUB_CACHE", dir.file("hub"));

  EXPECT_EQ(anvil::io::resolve_model_path(dir.path()), dir.path());
  EXPECT_EQ(anvil::io::resolve_model_path("org/tiny-model"), repo + "/snapshots/abc123");
  EXPECT_EQ(anvil::io::resolve_model_path("org/tiny-model@def456"), repo + "/snapshots/def456");
  expect_error([&] { anvil::io::resolve_model_path("org/other"); },
               {"not in the local Hugging Face cache", "models--org--other", "refs/main"});
  expect_error([&] { anvil::io::resolve_model_path("org/tiny-model@nope"); }, {"snapshots/nope"});
  expect_error([&] { anvil::io::resolve_model_path("../x/y"); }, {"not a hub id"});
  expect_error([&] { anvil::io::resolve_model_path("a/b/c"); }, {"not a hub id"});
  {
    ScopedEnv no_cache("HF_HUB_CACHE", "");
    ScopedEnv home("HF_HOME", dir.path());
    EXPECT_EQ(anvil::io::resolve_model_path("org/tiny-model"), repo + "/snapshots/abc123");
  }
}

TEST(Checkpoint, StagingRingPlanMovesEveryByteOnce) {
  // Executes plan_ring as load_all's GPU path does, with host buffers standing in for the pinned ring
  // and the device tensors, over sizes that hit every boundary case.
  std::mt19937 rng(7);
  for (const uint64_t chunk : {1ull, 5ull, 64ull, 1000ull}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<uint64_t> sizes;
      const int n = 1 + static_cast<int>(rng() % 12);
      for (int i = 0; i < n; ++i) sizes.push_back(rng() % 4 == 0 ? 0 : rng() % (3 * chunk + 2));
      uint64_t total = 0;
      for (auto s : sizes) total += s;
      std::vector<uint8_t> src(total), dst(total, 0);
      for (auto& b : src) b = static_cast<uint8_t>(rng());
      std::vector<uint64_t> start(sizes.size(), 0);
      for (size_t i = 1; i < sizes.size(); ++i) start[i] = start[i - 1] + sizes[i - 1];

      const int ring = 3;
      std::vector<std::vector<uint8_t>> staging(ring, std::vector<uint8_t>(chunk));
      const auto plan = anvil::io::detail::plan_ring(sizes, chunk, ring);
      uint64_t moved = 0;
      for (size_t c = 0; c < plan.size(); ++c) {
        EXPECT_EQ(plan[c].slot, static_cast<int>(c % ring));
        uint64_t used = 0;
        for (const auto& p : plan[c].pieces) {
          ASSERT_GT(p.bytes, 0u);
          ASSERT_EQ(p.staging_offset, used);  // packed, in order
          ASSERT_LE(p.tensor_offset + p.bytes, sizes[p.tensor]);
          std::memcpy(staging[plan[c].slot].data() + p.staging_offset, src.data() + start[p.tensor] + p.tensor_offset, p.bytes);
          used += p.bytes;
        }
        ASSERT_LE(used, chunk);
        if (c + 1 < plan.size()) EXPECT_EQ(used, chunk) << "only the last chunk may be partly filled";
        for (const auto& p : plan[c].pieces)
          std::memcpy(dst.data() + start[p.tensor] + p.tensor_offset, staging[plan[c].slot].data() + p.staging_offset, p.bytes);
        moved += used;
      }
      EXPECT_EQ(moved, total);
      EXPECT_EQ(dst, src);
      EXPECT_EQ(plan.size(), (total + chunk - 1) / chunk);
    }
  }
}

// ---- GPU ------------------------------------------------------------------------------------------

TEST(CheckpointCuda, LoadAllToGpuEqualsCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& c : kAllDtypes) tensors.emplace_back(std::string("t.") + c.name, random_tensor(c.dtype, {3, 5}));
  tensors.emplace_back("big", random_tensor(at::kBFloat16, {1500, 1700}));  // ~5 MB: spans several ring chunks
  tensors.emplace_back("big2", random_tensor(at::kFloat, {1000, 999}));
  tensors.emplace_back("empty", at::empty({0, 7}, at::kBFloat16));
  tensors.emplace_back("scalar", random_tensor(at::kFloat, {}));
  anvil::io::save_checkpoint(dir.path(), tensors, 4'000'000);
  anvil::io::Checkpoint c(dir.path());
  EXPECT_GT(c.files().size(), 1u);
  // Both paths: the page-locked mapping (the default on a CUDA build) and the staging ring.
  for (const char* path : {"registered", "ring"}) {
    ::setenv("ANVIL_LOAD_PATH", path, 1);
    const auto gpu = c.load_all(at::Device(at::kCUDA, 0));
    ::unsetenv("ANVIL_LOAD_PATH");
    ASSERT_EQ(gpu.size(), tensors.size()) << path;
    for (const auto& [name, t] : tensors) {
      const at::Tensor& g = gpu.at(name);
      EXPECT_TRUE(g.is_cuda()) << path << " " << name;
      EXPECT_TRUE(bit_equal(g, t)) << path << " " << name;
    }
  }
}

TEST(CheckpointCuda, LoadPathKnobIsChecked) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  anvil::io::save_checkpoint(dir.path(), {{"w", random_tensor(at::kFloat, {2, 3})}});
  anvil::io::Checkpoint c(dir.path());
  ::setenv("ANVIL_LOAD_PATH", "fast", 1);
  expect_error([&] { c.load_all(at::Device(at::kCUDA, 0)); }, {"ANVIL_LOAD_PATH", "auto, ring or registered", "fast"});
  ::unsetenv("ANVIL_LOAD_PATH");
}

}  // namespace
