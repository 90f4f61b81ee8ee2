package xmltree

import (
	"strings"
	"testing"
)

func TestParseMarshalRoundTrip(t *testing.T) {
	in := `<?xml version="1.0"?>
<!-- comment -->
<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>a &amp; b</name>
  <qemu:commandline><qemu:arg value="-x"/></qemu:commandline>
  <metadata><kubevirt xmlns="http://kubevirt.io"><uid>u</uid></kubevirt></metadata>
</domain>`
	n, err := Parse([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	out := string(n.Marshal())
	for _, want := range []string{`xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"`, "<qemu:arg value=\"-x\"></qemu:arg>", "a &amp; b", `<kubevirt xmlns="http://kubevirt.io">`} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %s:\n%s", want, out)
		}
	}
	m, err := Parse([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if d := Diff(n, m, nil); len(d) != 0 {
		t.Fatalf("marshal/parse changed the tree: %v", d)
	}
}

func TestParseErrors(t *testing.T) {
	for _, in := range []string{"", "<a>", "<a></b>", "<a/><b/>", "text", "<a><b></a></b>"} {
		if _, err := Parse([]byte(in)); err == nil {
			t.Errorf("Parse(%q) accepted", in)
		}
	}
	deep := strings.Repeat("<a>", maxDepth+1) + strings.Repeat("</a>", maxDepth+1)
	if _, err := Parse([]byte(deep)); err == nil {
		t.Error("too deep accepted")
	}
}

func TestDiff(t *testing.T) {
	a, _ := Parse([]byte(`<d x="1" y="2"><c id="a"/><c id="b"><q/></c><t>old</t><o>1</o></d>`))
	b, _ := Parse([]byte(`<d x="1" y="3" z="4"><o>1</o><c id="b"/><c id="a"/><t>new</t><n/></d>`))
	key := func(n *Node) string { v, _ := n.Attr("id"); return v }
	got := strings.Join(Diff(a, b, key), "\n")
	want := strings.Join([]string{
		"+ /d/n[0]",
		"+ /d@z=4",
		"- /d/c[b]/q[0]",
		"order /d/c: [c[a] c[b]] -> [c[b] c[a]]",
		"~ /d/t[0]#text: old -> new",
		"~ /d@y: 2 -> 3",
	}, "\n")
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(`<domain><devices><disk type="file"/></devices></domain>`))
	f.Add([]byte(`<a xmlns:q="x"><q:b c="&lt;"/>t</a>`))
	f.Fuzz(func(t *testing.T, data []byte) {
		n, err := Parse(data)
		if err != nil {
			return
		}
		m, err := Parse(n.Marshal())
		if err != nil {
			t.Fatalf("own output does not parse: %v\n%s", err, n.Marshal())
		}
		if d := Diff(n, m, nil); len(d) != 0 {
			t.Fatalf("marshal/parse changed the tree: %v", d)
		}
	})
}
