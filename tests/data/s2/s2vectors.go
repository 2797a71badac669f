// Writes S2 test vectors: for each input, the blocks from s2.Encode, EncodeBetter, EncodeBest
// and EncodeSnappy. Output: JSON lines {"name","mode","decoded_len","sha256","block_hex"}.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"

	"github.com/klauspost/compress/s2"
)

func main() {
	r := rand.New(rand.NewSource(17))
	inputs := map[string][]byte{}
	inputs["empty"] = []byte{}
	inputs["one"] = []byte("x")
	inputs["zeros_70000"] = make([]byte, 70000)
	rnd := make([]byte, 600)
	r.Read(rnd)
	inputs["random_600"] = rnd
	text := []byte{}
	for i := 0; len(text) < 20000; i++ {
		text = append(text, []byte(fmt.Sprintf("GET /index%d.html HTTP/1.1\r\nHost: example%d.test\r\n\r\n", i%37, i%5))...)
	}
	inputs["http_20000"] = text
	// packet-like: repeated headers with changing counters and random payload tails
	pk := []byte{}
	for i := 0; len(pk) < 12000; i++ {
		h := []byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0x08, 0x00, 0x45, 0x00, byte(i), byte(i >> 8)}
		pk = append(pk, h...)
		tail := make([]byte, r.Intn(300))
		for j := range tail {
			tail[j] = byte(r.Intn(4))
		}
		pk = append(pk, tail...)
	}
	inputs["packets_12000"] = pk
	long := make([]byte, 0, 200000)
	for len(long) < 200000 {
		long = append(long, []byte("abcdefgh")...)
		if r.Intn(1000) == 0 {
			long = append(long, byte(r.Intn(256)))
		}
	}
	inputs["long_runs_200000"] = long[:200000]
	enc := map[string]func([]byte, []byte) []byte{"encode": s2.Encode, "better": s2.EncodeBetter, "best": s2.EncodeBest, "snappy": s2.EncodeSnappy}
	w := json.NewEncoder(os.Stdout)
	for name, in := range inputs {
		for mode, f := range enc {
			b := f(nil, in)
			sum := sha256.Sum256(in)
			w.Encode(map[string]interface{}{"name": name, "mode": mode, "decoded_len": len(in), "sha256": hex.EncodeToString(sum[:]), "block_hex": hex.EncodeToString(b)})
		}
	}
}
