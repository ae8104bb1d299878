"""CUB-200-2011 in its own folder layout, with the class-name mapping to iNaturalist species names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..names import clean_class_name
from .base import ImageList, check_split_of, not_found, pil_loader

# --------------------------------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------------------------------
# classes.txt of CUB_200_2011, in order (class 1 first). iNat179 matches iNat species against these names.
CUB_FOLDER_NAMES = tuple(f"{i + 1:03d}.{n}" for i, n in enumerate("""
Black_footed_Albatross Laysan_Albatross Sooty_Albatross Groove_billed_Ani Crested_Auklet Least_Auklet
Parakeet_Auklet Rhinoceros_Auklet Brewer_Blackbird Red_winged_Blackbird Rusty_Blackbird
Yellow_headed_Blackbird Bobolink Indigo_Bunting Lazuli_Bunting Painted_Bunting Cardinal Spotted_Catbird
Gray_Catbird Yellow_breasted_Chat Eastern_Towhee Chuck_will_Widow Brandt_Cormorant Red_faced_Cormorant
Pelagic_Cormorant Bronzed_Cowbird Shiny_Cowbird Brown_Creeper American_Crow Fish_Crow Black_billed_Cuckoo
Mangrove_Cuckoo Yellow_billed_Cuckoo Gray_crowned_Rosy_Finch Purple_Finch Northern_Flicker
Acadian_Flycatcher Great_Crested_Flycatcher Least_Flycatcher Olive_sided_Flycatcher
Scissor_tailed_Flycatcher Vermilion_Flycatcher Yellow_bellied_Flycatcher Frigatebird Northern_Fulmar Gadwall
American_Goldfinch European_Goldfinch Boat_tailed_Grackle Eared_Grebe Horned_Grebe Pied_billed_Grebe
Western_Grebe Blue_Grosbeak Evening_Grosbeak Pine_Grosbeak Rose_breasted_Grosbeak Pigeon_Guillemot
California_Gull Glaucous_winged_Gull Heermann_Gull Herring_Gull Ivory_Gull Ring_billed_Gull
Slaty_backed_Gull Western_Gull Anna_Hummingbird Ruby_throated_Hummingbird Rufous_Hummingbird Green_Violetear
Long_tailed_Jaeger Pomarine_Jaeger Blue_Jay Florida_Jay Green_Jay Dark_eyed_Junco Tropical_Kingbird
Gray_Kingbird Belted_Kingfisher Green_Kingfisher Pied_Kingfisher Ringed_Kingfisher White_breasted_Kingfisher
Red_legged_Kittiwake Horned_Lark Pacific_Loon Mallard Western_Meadowlark Hooded_Merganser
Red_breasted_Merganser Mockingbird Nighthawk Clark_Nutcracker White_breasted_Nuthatch Baltimore_Oriole
Hooded_Oriole Orchard_Oriole Scott_Oriole Ovenbird Brown_Pelican White_Pelican Western_Wood_Pewee Sayornis
American_Pipit Whip_poor_Will Horned_Puffin Common_Raven White_necked_Raven American_Redstart Geococcyx
Loggerhead_Shrike Great_Grey_Shrike Baird_Sparrow Black_throated_Sparrow Brewer_Sparrow Chipping_Sparrow
Clay_colored_Sparrow House_Sparrow Field_Sparrow Fox_Sparrow Grasshopper_Sparrow Harris_Sparrow
Henslow_Sparrow Le_Conte_Sparrow Lincoln_Sparrow Nelson_Sharp_tailed_Sparrow Savannah_Sparrow
Seaside_Sparrow Song_Sparrow Tree_Sparrow Vesper_Sparrow White_crowned_Sparrow White_throated_Sparrow
Cape_Glossy_Starling Bank_Swallow Barn_Swallow Cliff_Swallow Tree_Swallow Scarlet_Tanager Summer_Tanager
Artic_Tern Black_Tern Caspian_Tern Common_Tern Elegant_Tern Forsters_Tern Least_Tern Green_tailed_Towhee
Brown_Thrasher Sage_Thrasher Black_capped_Vireo Blue_headed_Vireo Philadelphia_Vireo Red_eyed_Vireo
Warbling_Vireo White_eyed_Vireo Yellow_throated_Vireo Bay_breasted_Warbler Black_and_white_Warbler
Black_throated_Blue_Warbler Blue_winged_Warbler Canada_Warbler Cape_May_Warbler Cerulean_Warbler
Chestnut_sided_Warbler Golden_winged_Warbler Hooded_Warbler Kentucky_Warbler Magnolia_Warbler
Mourning_Warbler Myrtle_Warbler Nashville_Warbler Orange_crowned_Warbler Palm_Warbler Pine_Warbler
Prairie_Warbler Prothonotary_Warbler Swainson_Warbler Tennessee_Warbler Wilson_Warbler Worm_eating_Warbler
Yellow_Warbler Northern_Waterthrush Louisiana_Waterthrush Bohemian_Waxwing Cedar_Waxwing
American_Three_toed_Woodpecker Pileated_Woodpecker Red_bellied_Woodpecker Red_cockaded_Woodpecker
Red_headed_Woodpecker Downy_Woodpecker Bewick_Wren Cactus_Wren Carolina_Wren House_Wren Marsh_Wren Rock_Wren
Winter_Wren Common_Yellowthroat
""".split()))  # noqa: SIM905 (a block of names reads better than 200 quoted strings)


# CUB names that differ from iNat 2021's common names beyond case/punctuation/possessives (typos, old names,
# genus-level classes). Sayornis (a genus of three phoebes) has no single species and stays unmatched.
CUB_TO_INAT_NAME = {
    "Artic Tern": "Arctic Tern",
    "Cardinal": "Northern Cardinal",
    "Mockingbird": "Northern Mockingbird",
    "Nighthawk": "Common Nighthawk",
    "Geococcyx": "Greater Roadrunner",
    "Florida Jay": "Florida Scrub-Jay",
    "Frigatebird": "Magnificent Frigatebird",
    "Tree Sparrow": "American Tree Sparrow",
    "Myrtle Warbler": "Yellow-rumped Warbler",
    "Whip poor Will": "Eastern Whip-poor-will",
    "Green Violetear": "Mexican Violetear",
    "Nelson Sharp tailed Sparrow": "Nelson's Sparrow",
    "Le Conte Sparrow": "LeConte's Sparrow",
    "Cape Glossy Starling": "Cape Starling",
    "Forsters Tern": "Forster's Tern",
    "Great Grey Shrike": "Northern Shrike",
}


class CUB200(ImageList):
    """Caltech-UCSD Birds-200-2011 from its own layout (``images.txt``, ``classes.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``images/``).

    Args:
        root: the ``CUB_200_2011`` folder (or the folder that contains it).
        split: ``"train"`` (5,994 images), ``"test"`` (5,794) or ``"all"``.
        transform: applied to the PIL image.
        target_transform: applied to the int target (class id - 1).
        loader: image loader; RGB PIL by default.

    Attributes:
        classes: clean names (``001.Black_footed_Albatross`` -> ``Black footed Albatross``).
        folder_names: the raw names from ``classes.txt``.
        image_ids: CUB image id of each sample.

    >>> ds = CUB200("data/CUB_200_2011", split="train")  # doctest: +SKIP
    >>> ds.classes[0]  # doctest: +SKIP
    'Black footed Albatross'
    """

    SPLITS = ("train", "test", "all")
    FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = check_split_of(split, self.SPLITS, "CUB200")
        self.loader = loader or pil_loader
        for name in self.FILES:
            if not (root / name).is_file():
                raise not_found(root, name, "Point `root` at the extracted CUB_200_2011 folder.")
        if not (root / "images").is_dir():
            raise not_found(root, "the images/ folder", "Point `root` at the extracted CUB_200_2011 folder.")
        paths = self._table(root, "images.txt")
        class_rows = self._table(root, "classes.txt")
        labels = self._table(root, "image_class_labels.txt")
        is_train = self._table(root, "train_test_split.txt")
        self.folder_names = [class_rows[i] for i in sorted(class_rows)]
        if sorted(class_rows) != list(range(1, len(class_rows) + 1)):
            raise not_found(root, "classes.txt to number classes 1..N without gaps")
        samples, ids = [], []
        for image_id in sorted(paths):
            if image_id not in labels or image_id not in is_train:
                missing = "image_class_labels.txt" if image_id not in labels else "train_test_split.txt"
                raise not_found(root, f"{missing} to list image id {image_id} (it is in images.txt)")
            label, flag = labels[image_id], is_train[image_id]
            if not label.isdigit() or not 1 <= int(label) <= len(class_rows) or flag not in ("0", "1"):
                raise not_found(root, f"image id {image_id} to have a class in 1..{len(class_rows)} and a split "
                                      f"flag 0/1, got {label!r} and {flag!r}")
            if self.split == "all" or (flag == "1") == (self.split == "train"):
                samples.append((str(root / "images" / paths[image_id]), int(label) - 1))
                ids.append(image_id)
        self.image_ids = ids
        self._set_samples([clean_class_name(n) for n in self.folder_names], samples)

    @staticmethod
    def _table(root: Path, name: str) -> dict[int, str]:
        """``<id> <value>`` lines -> {id: value}; a malformed line names the file and the line."""
        out = {}
        for n, line in enumerate((root / name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise not_found(root, f"{name} line {n} to read '<id> <value>' but it is {line!r}")
            out[int(parts[0])] = parts[1].strip()
        if not out:
            raise not_found(root, f"{name} to list entries, but it is empty")
        return out
