package view

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"
)

// RenderDomain writes the inspect report: a header, one row per disk, the
// queue->IOThread map of every mapped disk, and one row per IOThread with
// its pinning and what it serves.
func RenderDomain(w io.Writer, d *Domain) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "Domain:\t%s\n", dash(d.Name))
	fmt.Fprintf(tw, "vCPUs:\t%d\n", d.VCPUs)
	fmt.Fprintf(tw, "IOThreads:\t%s\n", poolSummary(d.IOThreads))
	if d.SharedMemory != "" {
		fmt.Fprintf(tw, "Memory:\tshared (%s)\n", d.SharedMemory)
	} else {
		fmt.Fprintf(tw, "Memory:\tnot shared\n")
	}
	fmt.Fprintln(tw)

	fmt.Fprintln(tw, "DISK\tTARGET\tBUS\tDEVICE\tTYPE\tQUEUES\tIOTHREADS\tSOURCE")
	for _, k := range d.Disks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			dash(k.Name), dash(k.Target), dash(k.Bus), dash(k.Device), k.Type,
			queuesCell(k), ioThreadsCell(k), dash(k.Source))
	}

	var mapped []Disk
	for _, k := range d.Disks {
		if k.QueueMap != nil {
			mapped = append(mapped, k)
		}
	}
	if len(mapped) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "QUEUE MAP (queue>IOThread)")
		for _, k := range mapped {
			parts := make([]string, len(k.QueueMap))
			for q, id := range k.QueueMap {
				parts[q] = fmt.Sprintf("%d>%s", q, idOrDash(id))
			}
			fmt.Fprintf(tw, "%s\t%s\n", dash(k.Name), strings.Join(parts, " "))
		}
	}

	if len(d.IOThreads) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "IOTHREAD\tCPUSET\tPOLL\tSERVES")
		for _, t := range d.IOThreads {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", t.ID, dash(t.CPUSet), dash(t.Poll), dash(serves(d.Disks, t.ID)))
		}
	}
	if len(d.Warnings) > 0 {
		fmt.Fprintln(tw)
		for _, msg := range d.Warnings {
			fmt.Fprintf(tw, "WARNING: %s\n", msg)
		}
	}
	return tw.Flush()
}

// dash prints an empty cell as "-" and makes any other safe for a table
// on a terminal: the values come from the pod (paths, names, labels), and
// a tab, newline or escape sequence in them must not reach the screen raw.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return clean(s)
}

func clean(s string) string {
	for _, r := range s {
		if !unicode.IsGraphic(r) || r == '\t' {
			return strconv.QuoteToGraphic(s)
		}
	}
	return s
}

func idOrDash(id uint) string {
	if id == 0 {
		return "-"
	}
	return strconv.FormatUint(uint64(id), 10)
}

func poolSummary(ts []IOThread) string {
	if len(ts) == 0 {
		return "none (disk I/O runs in QEMU's main loop)"
	}
	ids := make([]uint, len(ts))
	for i, t := range ts {
		ids[i] = t.ID
	}
	return fmt.Sprintf("%d (ids %s)", len(ts), ranges(ids))
}

// ranges prints sorted ids compactly: 1-4,7.
func ranges(ids []uint) string {
	var b strings.Builder
	for i := 0; i < len(ids); {
		j := i
		for j+1 < len(ids) && ids[j+1] == ids[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", ids[i], ids[j])
		} else {
			fmt.Fprintf(&b, "%d", ids[i])
		}
		i = j + 1
	}
	return b.String()
}

func queuesCell(k Disk) string {
	switch {
	case k.Queues != 0:
		return strconv.FormatUint(uint64(k.Queues), 10)
	case k.Bus == "virtio":
		return "auto"
	}
	return "-"
}

func ioThreadsCell(k Disk) string {
	switch {
	case k.QueueMap != nil:
		var ids []uint
		seen := map[uint]bool{}
		for _, id := range k.QueueMap {
			if id != 0 && !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		slices.Sort(ids)
		return "map " + ranges(ids)
	case k.Pool != nil:
		ids := append([]uint(nil), k.Pool...)
		slices.Sort(ids)
		return "pool " + ranges(ids)
	case k.IOThread != 0:
		return strconv.FormatUint(uint64(k.IOThread), 10)
	case k.Bus == "virtio" && k.Type != "vhostuser" && k.Type != "vhostvdpa":
		return "main loop"
	}
	// vhost-user and vDPA queues are served outside QEMU.
	return "-"
}

// serves lists what an IOThread does: "data q0,q4; rootdisk all queues".
func serves(disks []Disk, id uint) string {
	var parts []string
	for _, k := range disks {
		name := k.Name
		if name == "" {
			name = k.Target
		}
		switch {
		case k.QueueMap != nil:
			var qs []string
			for q, t := range k.QueueMap {
				if t == id {
					qs = append(qs, "q"+strconv.Itoa(q))
				}
			}
			if len(qs) > 0 {
				parts = append(parts, name+" "+strings.Join(qs, ","))
			}
		case k.IOThread == id:
			parts = append(parts, name+" all queues")
		default:
			for _, p := range k.Pool {
				if p == id {
					parts = append(parts, name+" (pool)")
				}
			}
		}
	}
	return strings.Join(parts, "; ")
}
