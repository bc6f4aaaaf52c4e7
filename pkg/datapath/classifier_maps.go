package datapath

import (
	"context"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// mapState keeps one BPF map equal to desired content with as few syscalls as possible. K
// and V are the API's key and value types, KK and KV the kernel's. shadow is what the map
// holds, as far as this process knows; nil means unknown: the next diff reads the map.
type mapState[K, V comparable, KK, KV any] struct {
	m      *ebpf.Map
	batch  bool // try batch operations (hash maps, Linux 5.6+)
	key    func(K) KK
	val    func(V) KV
	decode func(KK, KV) (K, V)
	shadow map[K]V
}

// mapDiff is what one Apply changes: the entries to write and the keys to delete, on both
// sides of the codec.
type mapDiff[K, V comparable, KK, KV any] struct {
	up      []K
	upV     []V
	upKeys  []KK
	upVals  []KV
	del     []K
	delKeys []KK
	stats   MapStats
}

// diff compares desired with the map's content. check, if not nil, validates each desired
// entry. Unchanged entries cost one Go map lookup each and nothing else; the shadow is only
// walked when some of its keys are missing from desired.
func (s *mapState[K, V, KK, KV]) diff(desired map[K]V, check func(K, V) error) (mapDiff[K, V, KK, KV], error) {
	var d mapDiff[K, V, KK, KV]
	if s.shadow == nil {
		have, err := s.read()
		if err != nil {
			return d, err
		}
		s.shadow = have
	}
	for k, v := range desired {
		if check != nil {
			if err := check(k, v); err != nil {
				return mapDiff[K, V, KK, KV]{}, err
			}
		}
		old, ok := s.shadow[k]
		switch {
		case !ok:
			d.stats.Added++
		case old != v:
			d.stats.Updated++
		default:
			d.stats.Unchanged++
			continue
		}
		d.up = append(d.up, k)
		d.upV = append(d.upV, v)
		d.upKeys = append(d.upKeys, s.key(k))
		d.upVals = append(d.upVals, s.val(v))
	}
	if d.stats.Updated+d.stats.Unchanged < len(s.shadow) {
		for k := range s.shadow {
			if _, ok := desired[k]; !ok {
				d.del = append(d.del, k)
				d.delKeys = append(d.delKeys, s.key(k))
				d.stats.Removed++
			}
		}
	}
	return d, nil
}

const batchChunk = 4096

// read returns the map's content, with batch lookups where the kernel has them.
func (s *mapState[K, V, KK, KV]) read() (map[K]V, error) {
	out := map[K]V{}
	if s.batch {
		keys := make([]KK, batchChunk)
		vals := make([]KV, batchChunk)
		var cursor ebpf.MapBatchCursor
		for {
			n, err := s.m.BatchLookup(&cursor, keys, vals, nil)
			for i := range n {
				k, v := s.decode(keys[i], vals[i])
				out[k] = v
			}
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return out, nil
			}
			if errors.Is(err, ebpf.ErrNotSupported) {
				s.batch = false
				clear(out)
				break
			}
			if err != nil {
				return nil, err
			}
		}
	}
	var kk KK
	var kv KV
	it := s.m.Iterate()
	for it.Next(&kk, &kv) {
		k, v := s.decode(kk, kv)
		out[k] = v
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// upsert writes the added and changed entries and records them in the shadow. On error the
// shadow is dropped, so the next Apply reads the map instead of trusting what may be half
// written.
func (s *mapState[K, V, KK, KV]) upsert(ctx context.Context, d mapDiff[K, V, KK, KV]) error {
	if err := s.upsertEntries(ctx, d); err != nil {
		s.shadow = nil
		return err
	}
	for i, k := range d.up {
		s.shadow[k] = d.upV[i]
	}
	return nil
}

func (s *mapState[K, V, KK, KV]) upsertEntries(ctx context.Context, d mapDiff[K, V, KK, KV]) error {
	for i := 0; i < len(d.upKeys); {
		if err := ctx.Err(); err != nil {
			return err
		}
		end := min(i+batchChunk, len(d.upKeys))
		if s.batch {
			_, err := s.m.BatchUpdate(d.upKeys[i:end], d.upVals[i:end], nil)
			if errors.Is(err, ebpf.ErrNotSupported) {
				s.batch = false
				continue
			}
			if err != nil {
				return err
			}
		} else {
			for j := i; j < end; j++ {
				if err := s.m.Update(&d.upKeys[j], &d.upVals[j], ebpf.UpdateAny); err != nil {
					return fmt.Errorf("entry %v: %w", d.up[j], err)
				}
			}
		}
		i = end
	}
	return nil
}

// remove deletes the stale entries and drops them from the shadow (all of it on error).
func (s *mapState[K, V, KK, KV]) remove(ctx context.Context, d mapDiff[K, V, KK, KV]) error {
	if err := s.removeEntries(ctx, d); err != nil {
		s.shadow = nil
		return err
	}
	for _, k := range d.del {
		delete(s.shadow, k)
	}
	return nil
}

func (s *mapState[K, V, KK, KV]) removeEntries(ctx context.Context, d mapDiff[K, V, KK, KV]) error {
	for i := 0; i < len(d.delKeys); {
		if err := ctx.Err(); err != nil {
			return err
		}
		end := min(i+batchChunk, len(d.delKeys))
		if s.batch {
			_, err := s.m.BatchDelete(d.delKeys[i:end], nil)
			if errors.Is(err, ebpf.ErrNotSupported) {
				s.batch = false
				continue
			}
			// A batch delete stops at the first missing key (someone else removed it):
			// finish the chunk one by one, ignoring missing keys.
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				err = s.deleteEach(d.delKeys[i:end])
			}
			if err != nil {
				return err
			}
		} else if err := s.deleteEach(d.delKeys[i:end]); err != nil {
			return err
		}
		i = end
	}
	return nil
}

func (s *mapState[K, V, KK, KV]) deleteEach(keys []KK) error {
	for j := range keys {
		if err := s.m.Delete(&keys[j]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("key %+v: %w", keys[j], err)
		}
	}
	return nil
}
