package domainxml

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"
)

// knownLosses is what a libvirtxml round trip changes in KubeVirt XML, by
// rule, derived from the input tree. None of it matters to libvirt:
//   - the root's xmlns:qemu declaration (libvirtxml re-adds it only when
//     qemu: elements are present; the document has none);
//   - an empty <source/> (no attributes, no children) on an <interface> or
//     a <disk>: KubeVirt writes one for ethernet interfaces and, after its
//     lossy re-parse, for vhost-user disks; it carries nothing;
//   - KubeVirt's non-libvirt name= attribute on block disk <source>;
//   - pcie-root-port <target port='0x10'> is written in decimal ('16'),
//     the same number.
func knownLosses(in *xmltree.Node) []string {
	var out []string
	if v, ok := in.Attr("xmlns:qemu"); ok {
		out = append(out, fmt.Sprintf("- /domain@xmlns:qemu=%s", v))
	}
	devs := in.Child("devices")
	if devs == nil {
		return out
	}
	for _, dev := range devs.Children {
		if dev.Name != "interface" && dev.Name != "disk" {
			continue
		}
		if s := dev.Child("source"); s != nil && len(s.Attrs) == 0 && len(s.Children) == 0 {
			out = append(out, fmt.Sprintf("- /domain/devices[0]/%s[%s]/source[0]", dev.Name, libvirtKey(dev)))
		}
	}
	for _, d := range devs.All("disk") {
		if typ, _ := d.Attr("type"); typ != "block" {
			continue
		}
		if v, ok := d.Child("source").Attr("name"); ok {
			out = append(out, fmt.Sprintf("- /domain/devices[0]/disk[%s]/source[0]@name=%s", libvirtKey(d), v))
		}
	}
	for _, c := range devs.All("controller") {
		if t := c.Child("target"); t != nil {
			if v, ok := t.Attr("port"); ok && strings.HasPrefix(v, "0x") {
				n, err := strconv.ParseUint(v[2:], 16, 32)
				if err == nil {
					out = append(out, fmt.Sprintf("~ /domain/devices[0]/controller[%s]/target[0]@port: %s -> %d", libvirtKey(c), v, n))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// extrasLost lists KubeVirt's private disk children, which libvirtxml
// alone drops and KeepKubeVirtDiskExtras restores.
func extrasLost(in *xmltree.Node) []string {
	var out []string
	for _, d := range in.Child("devices").All("disk") {
		for _, c := range d.Children {
			if kubevirtDiskExtras[c.Name] {
				out = append(out, fmt.Sprintf("- /domain/devices[0]/disk[%s]/%s[0]", libvirtKey(d), c.Name))
			}
		}
	}
	return out
}

// TestRoundTripFidelity: unmarshal+marshal through libvirtxml keeps every
// element, attribute and text of each fixture, and the relative order of
// same-named siblings (disks, controllers), except exactly knownLosses and
// KubeVirt's private disk extras, which KeepKubeVirtDiskExtras puts back.
func TestRoundTripFidelity(t *testing.T) {
	for _, f := range fixtures {
		t.Run(f, func(t *testing.T) {
			in := readFixture(t, f)
			out, err := MarshalDomain(mustParse(t, in))
			if err != nil {
				t.Fatal(err)
			}
			a := mustTree(t, in)
			got := xmltree.Diff(a, mustTree(t, out), libvirtKey)
			want := dedupSorted(append(knownLosses(a), extrasLost(a)...))
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("libvirtxml round trip diff\n got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			kept, err := KeepKubeVirtDiskExtras(in, out)
			if err != nil {
				t.Fatal(err)
			}
			got = xmltree.Diff(a, mustTree(t, kept), libvirtKey)
			want = knownLosses(a)
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("round trip with extras kept\n got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

// TestIntendedChangesOnly: the diff between a fixture and our output is
// exactly the intended edits plus the round-trip losses above.
func TestIntendedChangesOnly(t *testing.T) {
	vhostSock := "/var/run/kubevirt-hooks/hook-sidecar-0/vhost/datadisk.sock"
	cases := []struct {
		sc   scenario
		want []string
	}{
		{
			sc: scenario{fixture: "auto-dedicated.xml", plan: IOThreadPlan{PoolSize: 2, CPUSet: "4-5", Disks: []DiskPlan{disk("ua-datadisk", 4)}}},
			want: []string{
				"+ /domain/cputune[0]",
				"+ /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]",
				"+ /domain/devices[0]/disk[ua-datadisk]/driver[0]@queues=4",
				"+ /domain/iothreadids[0]",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]@iothread=3",
				"~ /domain/iothreads[0]#text: 3 -> 4",
			},
		},
		{
			// Everything mapped: KubeVirt's whole-pool lists become
			// explicit per-queue maps over a pool that replaces KubeVirt's.
			sc: scenario{fixture: "supplemental-pool.xml", plan: IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 2), disk("ua-datadisk", 2), disk("ua-cloudinitdisk", 1)}}},
			want: []string{
				"+ /domain/devices[0]/disk[ua-cloudinitdisk]/driver[0]/iothreads[0]/iothread[1]/queue[0]",
				"+ /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]/iothread[1]/queue[0]",
				"+ /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]/iothread[2]/queue[1]",
				"+ /domain/devices[0]/disk[ua-rootdisk]/driver[0]/iothreads[0]/iothread[1]/queue[0]",
				"+ /domain/devices[0]/disk[ua-rootdisk]/driver[0]/iothreads[0]/iothread[2]/queue[1]",
				"+ /domain/iothreadids[0]",
				"- /domain/devices[0]/disk[ua-cloudinitdisk]/driver[0]/iothreads[0]/iothread[2]",
				"- /domain/devices[0]/disk[ua-cloudinitdisk]/driver[0]/iothreads[0]/iothread[3]",
				"- /domain/devices[0]/disk[ua-cloudinitdisk]/driver[0]/iothreads[0]/iothread[4]",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]/iothread[3]",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]/iothread[4]",
				"- /domain/devices[0]/disk[ua-rootdisk]/driver[0]/iothreads[0]/iothread[3]",
				"- /domain/devices[0]/disk[ua-rootdisk]/driver[0]/iothreads[0]/iothread[4]",
				"~ /domain/devices[0]/disk[ua-cloudinitdisk]/driver[0]@queues: 4 -> 1",
				"~ /domain/devices[0]/disk[ua-datadisk]/driver[0]@queues: 4 -> 2",
				"~ /domain/devices[0]/disk[ua-rootdisk]/driver[0]@queues: 4 -> 2",
				"~ /domain/iothreads[0]#text: 4 -> 2",
			},
		},
		{
			// vhost-user redirect of a block disk plus shared memory; the
			// other disks keep KubeVirt's pool 1..4.
			sc: scenario{fixture: "supplemental-pool.xml", vhost: map[string]VhostUserOptions{"ua-datadisk": {SocketPath: vhostSock, ReconnectSeconds: 10}}},
			want: []string{
				"+ /domain/devices[0]/disk[ua-datadisk]/source[0]/reconnect[0]",
				"+ /domain/devices[0]/disk[ua-datadisk]/source[0]@path=" + vhostSock,
				"+ /domain/devices[0]/disk[ua-datadisk]/source[0]@type=unix",
				"+ /domain/devices[0]/disk[ua-datadisk]@snapshot=no",
				"+ /domain/memoryBacking[0]",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]/iothreads[0]",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]@cache=none",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]@discard=unmap",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]@error_policy=stop",
				"- /domain/devices[0]/disk[ua-datadisk]/driver[0]@io=native",
				"- /domain/devices[0]/disk[ua-datadisk]/source[0]@dev=/dev/datadisk",
				"- /domain/devices[0]/disk[ua-datadisk]/source[0]@name=datadisk",
				"~ /domain/devices[0]/disk[ua-datadisk]@type: block -> vhostuser",
			},
		},
	}
	for _, c := range cases {
		t.Run(c.sc.fixture, func(t *testing.T) {
			in := readFixture(t, c.sc.fixture)
			out, _, err := c.sc.apply(in)
			if err != nil {
				t.Fatal(err)
			}
			a := mustTree(t, in)
			got := xmltree.Diff(a, mustTree(t, out), libvirtKey)
			want := append(knownLosses(a), c.want...)
			// The vhost case loses the block source's name= to the
			// redirect itself, not to the round trip.
			want = dedupSorted(want)
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Fatalf("diff\n got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

func dedupSorted(s []string) []string {
	sort.Strings(s)
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}
