package metrics

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// DefaultXFRMStatPath is where Linux publishes its XFRM error counters.
const DefaultXFRMStatPath = "/proc/net/xfrm_stat"

// XFRMStatFile reads the XFRM counters of the network namespace its Path belongs to.
type XFRMStatFile struct {
	// Path is the xfrm_stat file; "" means DefaultXFRMStatPath (the reading process's
	// namespace).
	Path string
}

var _ XFRMSource = XFRMStatFile{}

// XFRMStats implements XFRMSource.
func (f XFRMStatFile) XFRMStats(context.Context) (map[string]uint64, error) {
	p := f.Path
	if p == "" {
		p = DefaultXFRMStatPath
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("read xfrm stats: %w", err)
	}
	return ParseXFRMStat(bytes.NewReader(b))
}

// ParseXFRMStat parses the format of /proc/net/xfrm_stat: one "Name<blanks>value" per line.
// A malformed line or a name given twice is an error; blank lines are skipped.
func ParseXFRMStat(r io.Reader) (map[string]uint64, error) {
	out := map[string]uint64{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("parse xfrm stats: line %d: want a name and a value, got %q", n, sc.Text())
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("parse xfrm stats: line %d: %w", n, err)
		}
		if _, dup := out[f[0]]; dup {
			return nil, fmt.Errorf("parse xfrm stats: line %d: %s given twice", n, f[0])
		}
		out[f[0]] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse xfrm stats: %w", err)
	}
	return out, nil
}
