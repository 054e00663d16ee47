import pytest

from vitaclip.data.lists import folder_to_class_name, read_class_names, read_video_list, write_video_list


def test_parse_list_joins_root_and_keeps_labels(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("a/x.mp4,0\n\nb/y, with comma.mp4,3\n  c/z.mp4 , 2 \n")
    entries = read_video_list(str(f), "/data", num_classes=4)
    assert [(e.path, e.label, e.line) for e in entries] == [
        ("/data/a/x.mp4", 0, 1), ("/data/b/y, with comma.mp4", 3, 3), ("/data/c/z.mp4", 2, 4)]


@pytest.mark.parametrize("line,problem", [
    ("a.mp4", "expected 'path,label'"),
    (",3", "expected 'path,label'"),
    ("a.mp4,x", "not an integer"),
    ("a.mp4,1.5", "not an integer"),
    ("a.mp4,1_0", "not an integer"),  # int() takes these three
    ("a.mp4,\uff13", "not an integer"),
    ("a.mp4,\u0663", "not an integer"),
    ("a.mp4,-1", "out of range"),
    ("a.mp4,5", "out of range"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    f = tmp_path / "l.csv"
    f.write_text(f"ok.mp4,1\n{line}\nok2.mp4,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"l\.csv:2: .*{problem}"):
        read_video_list(str(f), num_classes=5)
    entries = read_video_list(str(f), num_classes=5, on_error="skip")
    assert [e.label for e in entries] == [1, 0]  # the good lines keep their labels
    assert len(entries.skipped) == 1 and "l.csv:2" in entries.skipped[0]


def test_a_negative_label_without_a_class_count_is_named_as_such(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("a.mp4,0\nb.mp4,-1\n")
    with pytest.raises(ValueError, match=r"^\S*l\.csv:2: label -1 is negative \(labels count from 0\)$"):
        read_video_list(str(f))  # it said "out of range [0, None)"


def test_signed_labels_and_a_byte_order_mark_are_read(tmp_path):
    f = tmp_path / "l.csv"
    f.write_bytes(b"\xef\xbb\xbfa.mp4,+1\r\nb.mp4,0\r\n")  # as Windows editors save UTF-8
    assert [(e.path, e.label) for e in read_video_list(str(f), "/data")] == [("/data/a.mp4", 1), ("/data/b.mp4", 0)]
    c = tmp_path / "classes.txt"
    c.write_bytes("\ufeffabseiling\ncaf\u00e9\n".encode("utf-8"))
    assert read_class_names(str(c)) == ["abseiling", "caf\u00e9"]


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path, on_error):
    f = tmp_path / "l.csv"
    f.write_bytes("a.mp4,0\ncaf\u00e9.mp4,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"l\.csv:2: not UTF-8 text \(byte 0xe9"):
        read_video_list(str(f), on_error=on_error)  # a whole-file problem, even when skipping bad lines
    c = tmp_path / "classes.txt"
    c.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"classes\.txt:1: not UTF-8"):
        read_class_names(str(c))


def test_a_folder_given_for_a_list_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder, not a list file"):
        read_video_list(str(tmp_path))


def test_a_missing_list_is_named_as_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^list file {tmp_path / 'none.csv'} does not exist$"):
        read_video_list(str(tmp_path / "none.csv"))  # it was open()'s bare "[Errno 2] No such file or directory"


def test_policy_is_checked(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("a,0\n")
    with pytest.raises(ValueError, match="on_error"):
        read_video_list(str(f), on_error="ignore")


def test_write_then_read_round_trip(tmp_path):
    f = str(tmp_path / "out.csv")
    write_video_list(f, [("v/a.mp4", 2), ("v/b.mp4", 0)])
    assert open(f).read() == "v/a.mp4,2\nv/b.mp4,0\n"
    assert [e.label for e in read_video_list(f)] == [2, 0]


@pytest.mark.parametrize("folder,name", [
    ("ApplyEyeMakeup", "apply eye makeup"), ("brush_hair", "brush hair"), ("YoYo", "yo yo"),
    ("PlayingDhol", "playing dhol"), ("Skijet", "skijet"), ("push_up", "push up"),
    ("HandstandPushups", "handstand pushups"), ("TaiChi", "tai chi"), ("JumpingJack", "jumping jack"),
    ("DJMixing", "dj mixing"), ("Top10Shots", "top10 shots"), ("Skiing_3D", "skiing 3d"), ("Skiing3D", "skiing3d"),
    ("Play3DChess", "play3d chess"),
])
def test_folder_names_become_words(folder, name):
    assert folder_to_class_name(folder) == name


def test_class_names_from_file_and_folders(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("abseiling\n\nair drumming\n")
    assert read_class_names(str(f)) == ["abseiling", "air drumming"]
    for d in ("brush_hair", "ApplyEyeMakeup", "cartwheel"):
        (tmp_path / "ds" / d).mkdir(parents=True)
    (tmp_path / "ds" / "README.txt").write_text("not a class")
    assert read_class_names(str(tmp_path / "ds")) == ["apply eye makeup", "brush hair", "cartwheel"]


@pytest.mark.parametrize("text", [
    "1 ApplyEyeMakeup\n2 BrushHair\n3 Cartwheel\n",          # UCF101's classInd.txt
    "id,name\n0,apply eye makeup\n1,brush_hair\n2,cartwheel\n",  # a CSV with a header
    "0\tApplyEyeMakeup\n1\tbrush hair\n\n2\tcartwheel\n",
    'id,name\n0,"apply eye makeup"\n1,brush_hair\n2,"cartwheel"\n',  # a CSV writer's quotes
    # CSVs read by their id and name columns in either order: a `name,id` header and its `name,0` lines
    # were read as class names, the header the first
    "name,id\napply eye makeup,0\nbrush_hair,1\ncartwheel,2\n",
    " Name , ID \nApplyEyeMakeup, 1\nbrush_hair ,2\ncartwheel,3\n",  # any case, spaces around
    '"name","id"\n"apply eye makeup",0\nbrush_hair,1\n"cartwheel",2\n',
    "ID,Name\n0,apply eye makeup\n1,brush_hair\n2,cartwheel\n",
])
def test_numbered_class_lists_give_the_names_alone(tmp_path, text):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    assert read_class_names(str(f)) == ["apply eye makeup", "brush hair", "cartwheel"]


def test_a_quoted_csv_name_keeps_its_commas_and_quotes_inside(tmp_path):
    f = tmp_path / "classes.csv"
    f.write_text('id,name\n0,"tying bow tie, knot"\n1,"say ""hi"""\n')
    assert read_class_names(str(f)) == ["tying bow tie, knot", 'say "hi"']


def test_a_csv_name_with_commas_comes_before_its_id(tmp_path):
    f = tmp_path / "classes.csv"
    f.write_text('name,id\n"tying bow tie, knot",0\ntop 10,1\n')
    assert read_class_names(str(f)) == ["tying bow tie, knot", "top 10"]


@pytest.mark.parametrize("text, match", [
    ("name,id\nrun,0\njump\n", r"classes\.csv:3: expected 'name,id' as the header line says, got 'jump'"),
    ("name,id\n0,run\n1,jump\n", r"classes\.csv:2: expected 'name,id' as the header line says, got '0,run'"),
    ("id,name\n0,run\njump,1\n", r"classes\.csv:3: expected 'id,name' as the header line says, got 'jump,1'"),
    ("name,id\nrun,1\njump,0\n", r"classes\.csv:3: class index 0 where 2 was expected"),
])
def test_a_csv_row_that_does_not_fit_its_id_and_name_header_is_refused(tmp_path, text, match):
    """Else every line, the header too, became a class name."""
    f = tmp_path / "classes.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_class_names(str(f))


@pytest.mark.parametrize("text, match", [
    ("1 run\n3 jump\n", r"classes\.txt:2: class index 3 where 2 was expected"),
    ("id,name\n1,run\n0,jump\n", r"classes\.txt:3: class index 0 where 2 was expected"),
    ("5 run\n6 jump\n", r"classes\.txt:1: a numbered class list starts at 0 or 1, not 5"),
    ("2 run\n3 jump\n", r"classes\.txt:1: a numbered class list starts at 0 or 1, not 2"),
])
def test_numbered_class_lists_out_of_order_are_refused(tmp_path, text, match):
    f = tmp_path / "classes.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_class_names(str(f))


@pytest.mark.parametrize("names", [["3 point shot", "running"], ["running", "1 on 1 basketball"],
                                   ["abseiling", "3 point shot"], ["background", "0 people", "1 person", "2 people"]])
def test_names_that_merely_start_with_a_number_stay_as_they_are(tmp_path, names):
    f = tmp_path / "classes.txt"
    f.write_text("\n".join(names) + "\n")
    assert read_class_names(str(f)) == names


def test_class_folders_skip_hidden_and_tool_folders_and_sort_plainly(tmp_path):
    for d in ("brush_hair", ".ipynb_checkpoints", "Zumba", "__pycache__", "_tmp", "abseiling"):
        (tmp_path / d).mkdir()
    assert read_class_names(str(tmp_path)) == ["zumba", "abseiling", "brush hair"]  # upper case sorts first



@pytest.mark.parametrize("folders", [("YoYo", "Yo_Yo"), ("Run", "run"), ("brush_hair", "brush__hair")])
def test_two_class_folders_read_as_one_name_are_named(tmp_path, folders):
    """Were refused later only as 'duplicate class name(s)', naming neither folder."""
    for d in (*folders, "abseiling"):
        (tmp_path / d).mkdir()
    with pytest.raises(ValueError, match=f"class folders {sorted(folders)[0]!r} and {sorted(folders)[1]!r} both "
                                         f"read as the class {folder_to_class_name(folders[0])!r}: rename one"):
        read_class_names(str(tmp_path))

def test_listed_path_is_relpath_of_the_joined_path():
    """listed_path's quick way for paths joined under the root gives what os.path.relpath does (the key
    of sidecar rows and list digests: another answer would orphan every sidecar)."""
    import os

    from vitaclip.data.lists import listed_path

    roots = ["data", "data/", "/abs/data", "/abs/data/", ".", "./", "a/..", "../up", "/", "a//b", "x/./y"]
    paths = ["v.mp4", "c/v.mp4", "./c/v.mp4", "c/../v.mp4", "../v.mp4", "c/../../v.mp4", "/abs/v.mp4", "c//v.mp4",
             "c/./v.mp4", ".", "..", "c/", "a/../../data/v.mp4", "...mp4", "..v.mp4"]
    for root in roots:
        for path in paths:
            joined = os.path.join(root, path)
            assert listed_path(joined, root) == os.path.relpath(joined, root), (root, path)
    assert listed_path("c/v.mp4", "") == "c/v.mp4"


def test_a_class_list_naming_no_classes_is_refused_by_name(tmp_path):
    """It came back empty from a blank file or a folder of videos without class folders; only the
    command line refused that, a script went on to a classless model or an evaluation over nothing."""
    blank = tmp_path / "classes.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"classes\.txt names no classes: it holds no lines"):
        read_class_names(str(blank))
    blank.write_text("ID , Name\n\n")  # was one class, "ID , Name"
    with pytest.raises(ValueError, match=r"classes\.txt names no classes: it holds only a header line, 'ID , Name'"):
        read_class_names(str(blank))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    (tmp_path / "videos" / ".cache").mkdir()
    with pytest.raises(ValueError, match=r"videos names no classes: it holds no class folders"):
        read_class_names(str(tmp_path / "videos"))


def test_a_video_list_given_as_the_class_list_is_refused(tmp_path):
    """Its lines became class names: zero-shot scored the videos against classes such as 'a/x.mp4,0'."""
    videos = tmp_path / "val.txt"
    videos.write_text("a/x.mp4,0\nb/y.mp4,1\n")
    with pytest.raises(ValueError, match=r"val\.txt holds 'path,label' lines \(the first: 'a/x\.mp4,0'\), a video "
                                         r"list, not class names"):
        read_class_names(str(videos))
