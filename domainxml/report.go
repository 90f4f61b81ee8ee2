package domainxml

import (
	"fmt"
	"log/slog"
	"strings"
)

// LogValue renders the report as slog attributes for the hook's one log
// line per call, e.g.
//
//	iothreads=4 kept=2 pool=3-4 disks="ua-data(vdb) q=4 3:[0 2] 4:[1 3]"
func (r Report) LogValue() slog.Value {
	pool := ""
	if n := len(r.PoolIDs); n > 0 {
		pool = fmt.Sprintf("%d-%d", r.PoolIDs[0], r.PoolIDs[n-1])
	}
	disks := make([]string, 0, len(r.Disks))
	for _, d := range r.Disks {
		var b strings.Builder
		fmt.Fprintf(&b, "%s(%s) q=%d", d.Alias, d.Dev, d.Queues)
		for _, t := range d.Threads {
			fmt.Fprintf(&b, " %d:%v", t.ID, t.Queues)
		}
		disks = append(disks, b.String())
	}
	return slog.GroupValue(
		slog.Uint64("iothreads", uint64(r.IOThreads)),
		slog.Uint64("kept", uint64(r.KeptIOThreads)),
		slog.String("pool", pool),
		slog.String("disks", strings.Join(disks, "; ")),
	)
}
