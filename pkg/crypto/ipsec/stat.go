package ipsec

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// XfrmStatPath is the kernel's XFRM error counters (CONFIG_XFRM_STATISTICS)
// of the reading thread's network namespace.
const XfrmStatPath = "/proc/net/xfrm_stat"

// ReadXfrmStat reads the XFRM counters at path ("" means [XfrmStatPath]):
// counter name (XfrmInNoStates, XfrmOutPolBlock, ...) to value. Every
// counter there counts an error or a drop; the ones to watch are
// XfrmInNoStates (ESP with an unknown SPI: a peer uses a key this node
// lacks), XfrmInTmplMismatch and XfrmInNoPols (traffic that should have
// been encrypted was not, or by the wrong node), XfrmInStateProtoError
// (integrity failures: wrong keys), XfrmInStateSeqError (replays, or
// reordering beyond the replay window), XfrmOutNoStates (a policy without
// its state), XfrmOutStateSeqError (an outbound sequence number ran out)
// and XfrmOutPolBlock.
//
// /proc/net is the namespace of the thread that opens it; read
// /proc/thread-self/net/xfrm_stat from a thread inside another namespace
// to see that namespace's counters.
func ReadXfrmStat(path string) (map[string]uint64, error) {
	if path == "" {
		path = XfrmStatPath
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read XFRM counters: %w", err)
	}
	m, err := ParseXfrmStat(b)
	if err != nil {
		return nil, fmt.Errorf("read XFRM counters %s: %w", path, err)
	}
	return m, nil
}

// ParseXfrmStat parses the text of /proc/net/xfrm_stat: lines of a name and
// a decimal value separated by blanks. Blank lines are ignored; anything
// else is an error naming the line.
func ParseXfrmStat(data []byte) (map[string]uint64, error) {
	out := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	line := 0
	for sc.Scan() {
		line++
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d: want NAME VALUE, got %d fields", line, len(f))
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: counter %s: value is not a number", line, f[0])
		}
		if _, dup := out[f[0]]; dup {
			return nil, fmt.Errorf("line %d: counter %s repeated", line, f[0])
		}
		out[f[0]] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("line %d: %w", line+1, err)
	}
	return out, nil
}
