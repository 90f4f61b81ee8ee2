package domainxml

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/virtblk/virtblk/domainxml/internal/xmltree"
	"github.com/virtblk/virtblk/domainxml/kvsim"
)

// TestSchemaValid: what we produce for every fixture and plan is accepted
// by libvirt's own RelaxNG schema.
func TestSchemaValid(t *testing.T) {
	docs := map[string][]byte{}
	for _, sc := range scenarios {
		out, _, err := sc.apply(readFixture(t, sc.fixture))
		if err != nil {
			t.Fatalf("%s: %v", sc, err)
		}
		docs[sc.String()+".xml"] = out
	}
	validateAll(t, docs)
}

// TestThreeCallSequence replays virt-launcher's OnDefineDomain sequence:
// call #2 and #3 see KubeVirt's lossy re-parse, not our output, and the
// final define must still carry exactly what call #1 produced.
func TestThreeCallSequence(t *testing.T) {
	docs := map[string][]byte{}
	for _, sc := range scenarios {
		t.Run(sc.String(), func(t *testing.T) {
			x := readFixture(t, sc.fixture)
			out1, rep1, err := sc.apply(x)
			if err != nil {
				t.Fatalf("call 1: %v", err)
			}
			in2, err := kvsim.Refeed(x, out1)
			if err != nil {
				t.Fatal(err)
			}
			out2, rep2, err := sc.apply(in2)
			if err != nil {
				t.Fatalf("call 2: %v\ninput:\n%s", err, in2)
			}
			in3, err := kvsim.RefeedAddingRootPorts(x, out2, 3)
			if err != nil {
				t.Fatal(err)
			}
			out3, rep3, err := sc.apply(in3)
			if err != nil {
				t.Fatalf("call 3: %v\ninput:\n%s", err, in3)
			}
			s1, s2, s3 := settings(t, out1), settings(t, out2), settings(t, out3)
			if s1 != s2 || s1 != s3 {
				t.Fatalf("settings differ across calls:\ncall1:\n%s\ncall2:\n%s\ncall3:\n%s", s1, s2, s3)
			}
			// As whole trees: later calls differ from call 1 only by what
			// libvirt added (disk addresses, PCI controllers).
			for i, out := range [][]byte{out2, out3} {
				for _, l := range xmltree.Diff(mustTree(t, out1), mustTree(t, out), libvirtKey) {
					if !libvirtAdded.MatchString(l) {
						t.Errorf("out%d differs from out1 beyond libvirt's additions: %s", i+2, l)
					}
				}
			}
			if fmt.Sprint(rep1) != fmt.Sprint(rep2) || fmt.Sprint(rep1) != fmt.Sprint(rep3) {
				t.Fatalf("reports differ: %+v / %+v / %+v", rep1, rep2, rep3)
			}
			// The lossy input really lost what we wrote, or this test
			// would prove nothing.
			if bytes.Contains(in2, []byte("<queue ")) || bytes.Contains(in2, []byte("<iothreadids>")) {
				t.Fatalf("call 2 input still has <queue>/<iothreadids>; the simulator is not lossy")
			}
			if n := countDisks(t, out3); n != countDisks(t, x) {
				t.Fatalf("call 3 has %d disks, input had %d", n, countDisks(t, x))
			}
			// Fixpoints: f(f(x)) == f(x) on every call's output.
			for i, out := range [][]byte{out1, out2, out3} {
				again, _, err := sc.apply(out)
				if err != nil {
					t.Fatalf("f(out%d): %v", i+1, err)
				}
				if !bytes.Equal(again, out) {
					t.Fatalf("f(out%d) != out%d:\n%s\n----\n%s", i+1, i+1, out, again)
				}
			}
			docs[sc.String()+"-call3.xml"] = out3
		})
	}
	validateAll(t, docs)
}

var libvirtAdded = regexp.MustCompile(`^\+ /domain/devices\[0\]/(disk\[[^\]]+\]/address\[0\]|controller\[pci:\d+\])$`)

func countDisks(t testing.TB, b []byte) int {
	d := mustParse(t, b)
	if d.Devices == nil {
		return 0
	}
	return len(d.Devices.Disks)
}

func TestPoolIDsAboveKubeVirtThreads(t *testing.T) {
	dom := mustParse(t, readFixture(t, "auto-dedicated.xml"))
	rep, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-datadisk", 4)}})
	if err != nil {
		t.Fatal(err)
	}
	// rootdisk keeps iothread 1, logdisk 2; datadisk's old 3 is freed.
	if rep.KeptIOThreads != 2 || fmt.Sprint(rep.PoolIDs) != "[3 4]" || rep.IOThreads != 4 {
		t.Fatalf("report %+v, want kept 2, pool [3 4], total 4", rep)
	}
	if got := *findDisk(dom, "ua-rootdisk").Driver.IOThread; got != 1 {
		t.Errorf("rootdisk iothread %d, want 1", got)
	}
	if got := *findDisk(dom, "ua-logdisk").Driver.IOThread; got != 2 {
		t.Errorf("logdisk iothread %d, want 2", got)
	}
	if got := marshal(t, dom.IOThreadIDs); got != `<DomainIOThreadIDs><iothread id="1"></iothread><iothread id="2"></iothread><iothread id="3"></iothread><iothread id="4"></iothread></DomainIOThreadIDs>` {
		t.Errorf("iothreadids %s", got)
	}
	d := findDisk(dom, "ua-datadisk")
	if d.Driver.IOThread != nil || *d.Driver.Queues != 4 {
		t.Fatalf("datadisk driver %+v", d.Driver)
	}
	if got := marshal(t, d.Driver.IOThreads); got != `<DomainDiskIOThreads><iothread id="3"><queue id="0"></queue><queue id="2"></queue></iothread><iothread id="4"><queue id="1"></queue><queue id="3"></queue></iothread></DomainDiskIOThreads>` {
		t.Errorf("datadisk mapping %s", got)
	}
}

func TestSupplementalPoolReplacedWhenAllDisksPlanned(t *testing.T) {
	dom := mustParse(t, readFixture(t, "supplemental-pool.xml"))
	rep, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-rootdisk", 4), disk("ua-datadisk", 4), disk("ua-cloudinitdisk", 1)}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.KeptIOThreads != 0 || dom.IOThreads != 2 || len(dom.IOThreadIDs.IOThreads) != 2 {
		t.Fatalf("report %+v iothreads %d", rep, dom.IOThreads)
	}
	// One queue: only the first pool thread is listed.
	if got := marshal(t, findDisk(dom, "ua-cloudinitdisk").Driver.IOThreads); got != `<DomainDiskIOThreads><iothread id="1"><queue id="0"></queue></iothread></DomainDiskIOThreads>` {
		t.Errorf("cloudinit mapping %s", got)
	}
}

func TestExplicitQueueMap(t *testing.T) {
	dom := mustParse(t, readFixture(t, "no-iothreads.xml"))
	rep, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 3, Disks: []DiskPlan{{Alias: "ua-scratch", Queues: 4, QueueMap: []int{2, 0, 2, 2}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(rep.Disks[0].Threads); got != "[{1 [1]} {3 [0 2 3]}]" {
		t.Fatalf("threads %s", got)
	}
	if rep.Disks[0].Dev != "vdb" {
		t.Fatalf("dev %q", rep.Disks[0].Dev)
	}
}

func TestPinsAndPolling(t *testing.T) {
	t.Run("kept pins stay, pool pins replaced", func(t *testing.T) {
		dom := mustParse(t, readFixture(t, "pci-defined.xml"))
		if _, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 2, CPUSet: "11-12", Polling: poll, Disks: []DiskPlan{disk("ua-pgdata", 4)}}); err != nil {
			t.Fatal(err)
		}
		// rootdisk keeps ids 1,2 and their KubeVirt pins; pool is 3,4.
		got := marshal(t, dom.CPUTune.IOThreadPin)
		want := `<DomainCPUTuneIOThreadPin iothread="1" cpuset="8"></DomainCPUTuneIOThreadPin><DomainCPUTuneIOThreadPin iothread="2" cpuset="9"></DomainCPUTuneIOThreadPin><DomainCPUTuneIOThreadPin iothread="3" cpuset="11-12"></DomainCPUTuneIOThreadPin><DomainCPUTuneIOThreadPin iothread="4" cpuset="11-12"></DomainCPUTuneIOThreadPin>`
		if got != want {
			t.Fatalf("pins\n got %s\nwant %s", got, want)
		}
		if len(dom.CPUTune.VCPUPin) != 4 || dom.CPUTune.EmulatorPin == nil {
			t.Fatal("other cputune content lost")
		}
		ids := dom.IOThreadIDs.IOThreads
		if ids[0].Poll != nil || ids[1].Poll != nil || ids[2].Poll == nil || *ids[3].Poll.Max != 32768 || *ids[3].Poll.Grow != 2 || *ids[3].Poll.Shrink != 4 {
			t.Fatalf("poll on wrong threads: %s", marshal(t, dom.IOThreadIDs))
		}
	})
	t.Run("pins of removed threads dropped", func(t *testing.T) {
		dom := mustParse(t, readFixture(t, "pci-defined.xml"))
		if _, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-rootdisk", 2), disk("ua-pgdata", 2)}}); err != nil {
			t.Fatal(err)
		}
		if got := marshal(t, dom.CPUTune.IOThreadPin); got != `<DomainCPUTuneIOThreadPin iothread="1" cpuset="8"></DomainCPUTuneIOThreadPin>` {
			t.Fatalf("pins %s", got)
		}
	})
	t.Run("existing iothreadids attributes kept for kept ids only", func(t *testing.T) {
		dom := mustParse(t, readFixture(t, "auto-dedicated.xml"))
		mn, mx := uint(2), uint(8)
		dom.IOThreadIDs = &libvirtxml.DomainIOThreadIDs{IOThreads: []libvirtxml.DomainIOThread{
			{ID: 1, PoolMin: &mn, PoolMax: &mx}, {ID: 3, PoolMin: &mn},
		}}
		if _, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-datadisk", 1)}}); err != nil {
			t.Fatal(err)
		}
		ids := dom.IOThreadIDs.IOThreads
		if len(ids) != 3 || ids[0].PoolMax == nil || *ids[0].PoolMax != 8 || ids[2].PoolMin != nil {
			t.Fatalf("iothreadids %s", marshal(t, dom.IOThreadIDs))
		}
	})
}

func TestEmptyPlanIsNoOp(t *testing.T) {
	for _, f := range fixtures {
		dom := mustParse(t, readFixture(t, f))
		before := marshal(t, dom)
		rep, err := ApplyIOThreads(dom, IOThreadPlan{})
		if err != nil || marshal(t, dom) != before || rep.IOThreads != 0 {
			t.Fatalf("%s: empty plan changed the domain (err %v)", f, err)
		}
	}
}

// TestEvenness: with the default round-robin, per disk no IOThread gets
// more than one queue more than another, every queue is mapped once, and
// exactly min(queues, pool) IOThreads are used.
func TestEvenness(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := readFixture(t, "no-iothreads.xml")
	for i := 0; i < 300; i++ {
		pool := 1 + rng.IntN(16)
		qa, qb := 1+rng.IntN(64), 1+rng.IntN(64)
		plan := IOThreadPlan{PoolSize: pool, Disks: []DiskPlan{disk("ua-rootdisk", qa), disk("ua-scratch", qb)}}
		_, rep, err := RewriteIOThreads(base, plan)
		if err != nil {
			t.Fatalf("%+v: %v", plan, err)
		}
		for _, d := range rep.Disks {
			lo, hi, total := 1<<30, 0, 0
			for _, th := range d.Threads {
				lo, hi = min(lo, len(th.Queues)), max(hi, len(th.Queues))
				total += len(th.Queues)
			}
			if hi-lo > 1 || total != d.Queues || len(d.Threads) != min(d.Queues, pool) {
				t.Fatalf("pool %d disk %s queues %d: uneven mapping %v", pool, d.Alias, d.Queues, d.Threads)
			}
		}
	}
}

func TestPlanErrors(t *testing.T) {
	mixed := readFixture(t, "mixed-sata-cdrom.xml")
	cases := []struct {
		name string
		in   []byte
		plan IOThreadPlan
		want []string
	}{
		{"unknown alias", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-nope", 1)}}, []string{"ua-nope not found", "ua-myvolume"}},
		{"sata disk", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-should_default_to_disk", 1)}}, []string{"ua-should_default_to_disk (target sdc)", `bus "sata"`, "needs bus virtio"}},
		{"cdrom", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-cdrom_tray_open", 1)}}, []string{"ua-cdrom_tray_open (target sdb)", "is a cdrom"}},
		{"vhost-user disk", readFixture(t, "vhostuser-refeed.xml"), IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-fastdisk", 1)}}, []string{"ua-fastdisk (target vdb)", "vhost-user", "back-end"}},
		{"pool 0 with disks", mixed, IOThreadPlan{Disks: []DiskPlan{disk("ua-myvolume", 1)}}, []string{"pool size 0", "at least 1"}},
		{"queues 0", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-myvolume", 0)}}, []string{"ua-myvolume", "0 queues", "between 1 and 1024"}},
		{"queues too many", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-myvolume", 1025)}}, []string{"1025 queues"}},
		{"pool too big", mixed, IOThreadPlan{PoolSize: MaxIOThreads + 1, Disks: []DiskPlan{disk("ua-myvolume", 1)}}, []string{"pool size 4097"}},
		{"duplicate disk", mixed, IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-myvolume", 1), disk("ua-myvolume", 2)}}, []string{"ua-myvolume is listed twice"}},
		{"queue map length", mixed, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{{Alias: "ua-myvolume", Queues: 2, QueueMap: []int{0}}}}, []string{"1 entries for 2 queues"}},
		{"queue map range", mixed, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{{Alias: "ua-myvolume", Queues: 2, QueueMap: []int{0, 2}}}}, []string{"queue 1 maps to pool IOThread 2", "0..1"}},
		{"bad cpuset", mixed, IOThreadPlan{PoolSize: 1, CPUSet: "2-x", Disks: []DiskPlan{disk("ua-myvolume", 1)}}, []string{`cpuset "2-x"`, `"x" is not a CPU number`}},
		{"huge kubevirt id", bytes.Replace(mixed, []byte(`iothread="3"`), []byte(`iothread="999999"`), 1), IOThreadPlan{PoolSize: 1, Disks: []DiskPlan{disk("ua-myvolume", 1)}}, []string{"ua-nocloud (target vdb)", "IOThread 999999", "limit"}},
		{"not xml", []byte("<domain"), IOThreadPlan{PoolSize: 1}, []string{"parse domain XML"}},
		{"not a domain", []byte("<network/>"), IOThreadPlan{PoolSize: 1}, []string{"parse domain XML", "domain"}},
		{"empty input", nil, IOThreadPlan{PoolSize: 1}, []string{"parse domain XML: input is empty"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := RewriteIOThreads(c.in, c.plan)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestCheckRules breaks each rule on an otherwise valid output and checks
// that the error names the disk (alias and target) and the rule.
func TestCheckRules(t *testing.T) {
	plan := IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-datadisk", 4)}}
	good := func(t *testing.T) *libvirtxml.Domain {
		dom := mustParse(t, readFixture(t, "auto-dedicated.xml"))
		if _, err := ApplyIOThreads(dom, plan); err != nil {
			t.Fatal(err)
		}
		if err := Check(dom, plan); err != nil {
			t.Fatal(err)
		}
		return dom
	}
	u := func(v uint) *uint { return &v }
	cases := []struct {
		rule   string
		dev    string
		break_ func(d *libvirtxml.Domain)
	}{
		{RuleVirtioBus, "vdb", func(d *libvirtxml.Domain) { findDisk(d, "ua-datadisk").Target.Bus = "sata" }},
		{RuleIOThreadXorList, "vdb", func(d *libvirtxml.Domain) { findDisk(d, "ua-datadisk").Driver.IOThread = u(3) }},
		{RuleQueuesSet, "vdb", func(d *libvirtxml.Domain) { findDisk(d, "ua-datadisk").Driver.Queues = nil }},
		{RuleIOThreadDefined, "vdb", func(d *libvirtxml.Domain) {
			findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread[0].ID = 9
		}},
		{RuleIOThreadIDValid, "vdb", func(d *libvirtxml.Domain) {
			findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread[0].ID = 0
		}},
		{RuleIOThreadOnce, "vdb", func(d *libvirtxml.Domain) {
			ts := findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread
			ts[1].ID = ts[0].ID
		}},
		{RuleAllOrNone, "vdb", func(d *libvirtxml.Domain) {
			findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread[1].Queues = nil
		}},
		{RuleQueueInRange, "vdb", func(d *libvirtxml.Domain) {
			findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread[0].Queues[0].ID = 4
		}},
		{RuleQueueOnce, "vdb", func(d *libvirtxml.Domain) {
			q := findDisk(d, "ua-datadisk").Driver.IOThreads.IOThread[0].Queues
			q[1].ID = q[0].ID
		}},
		{RuleQueueOnce, "vdb", func(d *libvirtxml.Domain) { findDisk(d, "ua-datadisk").Driver.Queues = u(5) }},
		{RuleIOThreadDefined, "vda", func(d *libvirtxml.Domain) { findDisk(d, "ua-rootdisk").Driver.IOThread = u(7) }},
		{RuleIOThreadsCount, "", func(d *libvirtxml.Domain) { d.IOThreads = 9 }},
		{RuleIOThreadIDsUnique, "", func(d *libvirtxml.Domain) { d.IOThreadIDs.IOThreads[1].ID = 1 }},
		{RulePinDefined, "", func(d *libvirtxml.Domain) {
			d.CPUTune = &libvirtxml.DomainCPUTune{IOThreadPin: []libvirtxml.DomainCPUTuneIOThreadPin{{IOThread: 5, CPUSet: "1"}}}
		}},
		{RulePinCPUSet, "", func(d *libvirtxml.Domain) {
			d.CPUTune = &libvirtxml.DomainCPUTune{IOThreadPin: []libvirtxml.DomainCPUTuneIOThreadPin{{IOThread: 3, CPUSet: "1-"}}}
		}},
		{RuleDiskExists, "", func(d *libvirtxml.Domain) { findDisk(d, "ua-datadisk").Alias.Name = "ua-other" }},
	}
	for _, c := range cases {
		t.Run(c.rule, func(t *testing.T) {
			dom := good(t)
			c.break_(dom)
			err := Check(dom, plan)
			var re *RuleError
			if !errors.As(err, &re) {
				t.Fatalf("want RuleError, got %v", err)
			}
			if re.Rule != c.rule || re.Dev != c.dev {
				t.Fatalf("got rule %q dev %q (%v), want %q %q", re.Rule, re.Dev, err, c.rule, c.dev)
			}
			if c.dev != "" && !strings.Contains(err.Error(), "(target "+c.dev+")") {
				t.Fatalf("error %q does not name the target", err)
			}
			if !strings.Contains(err.Error(), c.rule) {
				t.Fatalf("error %q does not name the rule", err)
			}
		})
	}
}

// TestSchemaCatchesInvalid proves the schema validation above can fail:
// the lossy vhost-user input (empty <source>) is rejected, and the same
// document after ToVhostUser is accepted.
func TestSchemaCatchesInvalid(t *testing.T) {
	lossy := readFixture(t, "vhostuser-refeed.xml")
	res := lint(t, map[string][]byte{"lossy.xml": lossy})
	if res["lossy.xml"] == "" {
		t.Fatal("schema accepted a vhostuser disk without source path")
	}
	// The same document after our redirect validates.
	dom := mustParse(t, lossy)
	if err := ToVhostUser(dom, "ua-fastdisk", VhostUserOptions{SocketPath: testSock}); err != nil {
		t.Fatal(err)
	}
	out, err := MarshalDomain(dom)
	if err != nil {
		t.Fatal(err)
	}
	if why := lint(t, map[string][]byte{"fixed.xml": out})["fixed.xml"]; why != "" {
		t.Fatalf("redirected document rejected: %s", why)
	}
}

func TestReportLogValue(t *testing.T) {
	_, rep, err := RewriteIOThreads(readFixture(t, "auto-dedicated.xml"), IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{disk("ua-datadisk", 4)}})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}})).Info("rewrite", "plan", rep)
	want := `level=INFO msg=rewrite plan.iothreads=4 plan.kept=2 plan.pool=3-4 plan.disks="ua-datadisk(vdb) q=4 3:[0 2] 4:[1 3]"` + "\n"
	if buf.String() != want {
		t.Fatalf("got  %s\nwant %s", buf.String(), want)
	}
}

// Single-queue disks must not all land on the pool's first IOThread: each
// disk's round-robin continues where the previous disk's stopped.
func TestRoundRobinContinuesAcrossDisks(t *testing.T) {
	dom := mustParse(t, readFixture(t, "no-iothreads.xml"))
	rep, err := ApplyIOThreads(dom, IOThreadPlan{PoolSize: 2, Disks: []DiskPlan{
		{Alias: "ua-rootdisk", Queues: 1}, {Alias: "ua-scratch", Queues: 1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(rep.Disks[0].Threads, rep.Disks[1].Threads)
	if got != "[{1 [0]}] [{2 [0]}]" {
		t.Fatalf("threads %s, want the two disks on different IOThreads", got)
	}
}
